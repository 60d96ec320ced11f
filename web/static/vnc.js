// The graphical console on /console?<IP> for VMs with ConsoleType vnc: noVNC (novnc.js,
// @novnc/novnc's RFB bundled as an ES module) over the console WebSocket
// (web/console.py): the request JSON first, the answer back, then raw RFB bytes, which
// noVNC reads from the same (already open) WebSocket.
import "/static/novnc.js";

const ip = document.body.getAttribute("data-ip");
const status = document.getElementById("vnc-status");
const ws = new WebSocket("wss://" + location.host + "/ws/Hypervisor.ConnectToVmConsole");
ws.binaryType = "arraybuffer";
let answered = false;
ws.onopen = () => ws.send(JSON.stringify({ IpAddress: ip }));
ws.onmessage = (event) => {
  answered = true;
  const response = JSON.parse(event.data);
  if (response.Error) {
    status.textContent = "refused: " + response.Error;
    return;
  }
  // RFB attaches to the open WebSocket in its constructor (it takes over onmessage
  // before the next message is delivered).
  const rfb = new window.RFB(document.getElementById("screen"), ws);
  rfb.scaleViewport = true;
  rfb.addEventListener("connect", () => { status.textContent = "connected"; });
  rfb.addEventListener("disconnect", () => { status.textContent = "closed"; });
};
ws.onclose = () => { if (!answered) { status.textContent = "error: the WebSocket failed"; } };
