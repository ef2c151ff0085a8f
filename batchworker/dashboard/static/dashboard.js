// Live updates and charts. The server renders every page; this script only fetches a page's live part
// again (?partial=1, escaped HTML from the same server) and draws charts from JSON the page carries.
(function () {
  "use strict";
  const charts = [];

  function drawCharts(root) {
    while (charts.length) charts.pop().destroy();
    if (typeof Chart === "undefined") return;
    root.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      const source = document.getElementById(canvas.dataset.source);
      if (!source) return;
      const data = JSON.parse(source.textContent);
      const config = chartConfig(canvas.dataset.chart, data);
      if (config) charts.push(new Chart(canvas, config));
    });
  }

  function chartConfig(kind, data) {
    const base = { animation: false, responsive: true, maintainAspectRatio: false, plugins: { legend: { display: false } },
      scales: { y: { beginAtZero: true, ticks: { precision: 0 } } } };
    if (kind === "labels") {
      return { type: "bar", options: base,
        data: { labels: data.labels, datasets: [{ label: "items", data: data.counts, backgroundColor: "#1f6feb" }] } };
    }
    if (kind === "confidence") {
      const labels = data.confidence_bins.map(function (_, i) { return data.bin_edges[i] + "–" + data.bin_edges[i + 1]; });
      return { type: "bar", options: base,
        data: { labels: labels, datasets: [{ label: "items", data: data.confidence_bins, backgroundColor: "#8957e5" }] } };
    }
    if (kind === "cost") {
      return { type: "bar", options: Object.assign({}, base, { plugins: { legend: { display: true } },
          scales: { y: { title: { display: true, text: "dollars" }, beginAtZero: true } } }),
        data: { labels: data.windows, datasets: [
          { label: "this system", data: data.this_system, backgroundColor: "#1f6feb" },
          { label: "always-on 9-17", data: data.always_on, backgroundColor: "#d29922" },
          { label: "start-per-upload", data: data.per_upload, backgroundColor: "#cf222e" } ] } };
    }
    return null;
  }

  function startPolling(live) {
    const every = parseInt(live.dataset.refreshMs, 10);
    if (!(every > 0)) return;
    const stamp = document.getElementById("updated");
    let busy = false;
    const timer = setInterval(async function () {
      if (busy || document.hidden) return;
      if (live.querySelector("[data-final]")) { clearInterval(timer); return; }
      busy = true;
      try {
        const url = new URL(window.location.href);
        url.searchParams.set("partial", "1");
        const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
        if (response.ok) {
          live.innerHTML = await response.text();
          drawCharts(live);
          if (stamp) stamp.textContent = new Date().toISOString().slice(11, 19) + " UTC";
          live.classList.remove("stale");
        } else {
          live.classList.add("stale");
        }
      } catch (error) {
        live.classList.add("stale");  // the dashboard stopped; keep what is shown
      } finally {
        busy = false;
      }
    }, every);
  }

  const live = document.getElementById("live");
  drawCharts(document);
  if (live) startPolling(live);
})();
