// The serial console page (/console?<IP>): xterm.js over the console WebSocket
// (web/console.py): the request JSON first, the response JSON back, then raw bytes.
(function () {
  "use strict";
  var ip = document.body.getAttribute("data-ip");
  var status = document.getElementById("console-status");
  var term = new Terminal({ cursorBlink: true, scrollback: 5000 });
  term.open(document.getElementById("terminal"));
  term.focus();
  var ws = new WebSocket("wss://" + location.host + "/ws/Hypervisor.ConnectToVmSerialPort");
  ws.binaryType = "arraybuffer";
  var connected = false;
  var encoder = new TextEncoder();
  function say(text) { status.textContent = text; }
  ws.onopen = function () {
    ws.send(JSON.stringify({ IpAddress: ip, PortNumber: 0 }));
  };
  ws.onmessage = function (event) {
    if (!connected) {
      var response = JSON.parse(event.data);
      if (response.Error) { say("refused: " + response.Error); return; }
      connected = true;
      say("connected");
      return;
    }
    term.write(new Uint8Array(event.data));
  };
  ws.onclose = function () { connected = false; if (status.textContent === "connected" || status.textContent === "connecting") { say("closed"); } };
  ws.onerror = function () { say("error: the WebSocket failed"); };
  term.onData(function (data) {
    if (connected && ws.readyState === WebSocket.OPEN) { ws.send(encoder.encode(data)); }
  });
})();
