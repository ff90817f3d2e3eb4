// Switchyard dashboard: live updates from <dashboard>/events (Server-Sent Events). The pages
// work without it; this only keeps them current.
(function () {
  "use strict";
  var body = document.body;
  var dash = body.getAttribute("data-dashboard");
  var url = body.getAttribute("data-events");
  if (!url || !window.EventSource) { return; }
  var status = document.getElementById("live-status");
  var lastReload = 0;

  function text(el, value) { if (el) { el.textContent = value; } }

  function setState(el, state) {
    if (!el) { return; }
    el.textContent = state;
    el.className = el.className.replace(/\bstate-[A-Z]+\b/g, "").trim() + " state-" + state;
  }

  function progressCell(cell, p) {
    if (!cell || !p) { return; }
    cell.textContent = "";
    var bar = document.createElement("progress");
    bar.max = p.total || 1;
    bar.value = p.done || 0;
    cell.appendChild(bar);
    cell.appendChild(document.createTextNode(" " + p.done + "/" + p.total));
  }

  function taskRow(ev) {
    var table = document.getElementById("task-table");
    if (!table) { return; }
    var row = table.querySelector('tr[data-task-id="' + CSS.escape(ev.task_id) + '"]');
    if (!row) {
      if (table.getAttribute("data-live") !== "1") { return; }
      row = document.createElement("tr");
      row.setAttribute("data-task-id", ev.task_id);
      row.className = "fresh";
      var cells = ["id", "task", "queue", "state", "progress", "node", "at"];
      cells.forEach(function (name) {
        var td = document.createElement("td");
        td.className = name;
        row.appendChild(td);
      });
      var link = document.createElement("a");
      link.href = dash + "tasks/" + encodeURIComponent(ev.task_id);
      var code = document.createElement("code");
      code.textContent = ev.task_id;
      link.appendChild(code);
      row.children[0].appendChild(link);
      text(row.children[1], ev.task);
      text(row.children[2], ev.queue);
      row.children[3].className = "state";
      var tbody = table.tBodies[0];
      tbody.insertBefore(row, tbody.firstChild);
    }
    if (ev.kind !== "task-progress" && !(ev.kind === "task-received" && row.children[3].textContent)) {
      setState(row.children[3], ev.state);
    }
    if (ev.progress) { progressCell(row.children[4], ev.progress); }
    text(row.children[5], ev.node);
    text(row.children[6], ev.at);
  }

  function taskPage(ev) {
    var dl = document.querySelector("dl.task");
    if (!dl || dl.getAttribute("data-task-id") !== ev.task_id) { return; }
    if (ev.kind !== "task-progress") { setState(document.getElementById("task-state"), ev.state); }
    if (ev.progress) {
      var bar = document.getElementById("task-progress");
      if (bar) { bar.hidden = false; bar.max = ev.progress.total || 1; bar.value = ev.progress.done || 0; }
      text(document.getElementById("task-progress-text"), ev.progress.done + "/" + ev.progress.total);
    }
    var list = document.getElementById("task-events");
    if (list) {
      var li = document.createElement("li");
      li.textContent = ev.kind + " " + ev.state + " on " + ev.node + " at " + ev.at;
      list.appendChild(li);
    }
  }

  var source = new EventSource(url);
  source.onopen = function () { text(status, "live"); if (status) { status.className = "on"; } };
  source.onerror = function () { text(status, "reconnecting"); if (status) { status.className = ""; } };
  source.onmessage = function (msg) {
    var ev;
    try { ev = JSON.parse(msg.data); } catch (e) { return; }
    if (!ev || !ev.kind || ev.kind === "node-heartbeat") { return; }
    taskRow(ev);
    taskPage(ev);
  };
  // Missed events (a reconnect from too long ago, or a slow tab): a fresh page is the snapshot.
  source.addEventListener("snapshot", function () {
    var now = Date.now();
    if (now - lastReload > 5000) { lastReload = now; window.location.reload(); }
  });
}());
