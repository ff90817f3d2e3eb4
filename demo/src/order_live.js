// The order page: #task-state and the progress bar follow the e-mail task live, from
// /orders/{id}/events (Server-Sent Events, the order's owner only).
(function () {
  "use strict";
  var p = document.getElementById("order-live");
  var state = document.getElementById("task-state");
  var bar = document.getElementById("task-progress");
  if (!p || !state || !window.EventSource) { return; }
  var finished = { SUCCESS: 1, FAILURE: 1, REVOKED: 1 };
  if (finished[state.textContent]) { return; }
  var source = new EventSource(p.getAttribute("data-events"));
  source.onmessage = function (msg) {
    var ev;
    try { ev = JSON.parse(msg.data); } catch (e) { return; }
    if (ev.progress && bar) {
      bar.max = ev.progress.total || 1;
      bar.value = ev.progress.done || 0;
    }
    if (ev.kind !== "task-progress" && ev.state) { state.textContent = ev.state; }
    if (ev.state === "STARTED" && bar && !ev.progress) { bar.removeAttribute("value"); }
    if (finished[ev.state]) {
      if (bar) { bar.max = 1; bar.value = 1; }
      source.close();
    }
  };
  source.addEventListener("snapshot", function () { window.location.reload(); });
}());
