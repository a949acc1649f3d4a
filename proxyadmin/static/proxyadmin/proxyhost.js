// The proxy host page (templates/admin/proxyadmin/host/proxy_host.html): shows only the
// fields of the certificate choice and HSTS preset made, and refreshes "Will be served"
// from the server as names or the certificate choice change. The page works without it.
"use strict";

(function () {
  const form = document.getElementById("proxy-host-form");
  if (!form) return;
  const served = document.getElementById("served-certificate");
  const value = (name) => {
    const checked = form.querySelector(`[name="${name}"]:checked`);
    if (checked) return checked.value;
    const field = form.querySelector(`[name="${name}"]:not([type=radio])`);
    return field ? field.value : "";
  };
  const showRow = (name, shown) => {
    const row = form.querySelector(`.field-${name}`);
    if (row) row.hidden = !shown;
  };

  function showChoices() {
    const tls = value("tls");
    showRow("certificate", tls === "stored");
    showRow("acme", tls === "acme");
    const custom = value("hsts") === "custom";
    showRow("hsts_max_age", custom);
    showRow("hsts_include_subdomains", custom);
  }

  let timer = null;
  let asked = 0;
  async function refresh() {
    const query = new URLSearchParams({
      names: value("names"), tls: value("tls"), certificate: value("certificate"),
      host: form.dataset.host || "",
    });
    const ticket = ++asked;
    try {
      const response = await fetch(`${form.dataset.previewUrl}?${query}`, {credentials: "same-origin"});
      if (!response.ok || ticket !== asked) return;
      const preview = await response.json();
      served.textContent = preview.text;
      served.className = `status-${preview.level}`;
    } catch (error) {
      // Offline for a moment: the line is refreshed again at the next change, and on save.
    }
  }

  form.addEventListener("input", (event) => {
    showChoices();
    if (["names", "tls", "certificate"].includes(event.target.name)) {
      clearTimeout(timer);
      timer = setTimeout(refresh, 250);
    }
  });
  form.addEventListener("change", () => showChoices());
  showChoices();
  // Typed before this script ran (it is deferred): say what that will serve now.
  if (value("names") !== form.dataset.loadedNames) refresh();
})();
