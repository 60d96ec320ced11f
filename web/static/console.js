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
  var answered = false;
  var encoder = new TextEncoder();
  function say(text) { status.textContent = text; }
  ws.onopen = function () {
    ws.send(JSON.stringify({ IpAddress: ip, PortNumber: 0 }));
  };
  ws.onmessage = function (event) {
    if (!connected) {
      answered = true;
      var response = JSON.parse(event.data);
      if (response.Error) { say("refused: " + response.Error); return; }
      connected = true;
      say("connected");
      return;
    }
    term.write(new Uint8Array(event.data));
  };
  // A refusal (or the end) is kept on the page: the close that follows it may be
  // reported as an error by the browser.
  ws.onclose = function () {
    if (connected) { say("closed"); } else if (!answered) { say("error: the WebSocket failed"); }
    connected = false;
  };
  term.onData(function (data) {
    if (connected && ws.readyState === WebSocket.OPEN) { ws.send(encoder.encode(data)); }
  });
})();
