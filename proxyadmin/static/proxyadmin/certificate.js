// The certificate add/change form (templates/admin/proxyadmin/certificate/change_form.html):
// Save first posts the form to the admin's check URL, which validates it as Save would and
// saves nothing. A refused upload is shown here without leaving the page, so the chosen
// files, the pasted key and the passphrase stay (a page rendered by the server never gives
// a key back). Accepted, the form is submitted as usual and validated again. Without this
// script, or when the check cannot be reached, Save works as it always did.
"use strict";

(function () {
  const check = document.getElementById("certificate-check");
  const form = check && check.closest("form");
  if (!form) return;
  let checked = false;

  function clearErrors() {
    form.querySelectorAll(".certificate-check-error").forEach((node) => node.remove());
    form.querySelectorAll(".form-row.certificate-check-errors").forEach((row) => {
      row.classList.remove("errors", "certificate-check-errors");
    });
  }

  function errorList(messages, extraClass) {
    const list = document.createElement("ul");
    list.className = `errorlist certificate-check-error ${extraClass}`.trim();
    for (const message of messages) {
      const item = document.createElement("li");
      item.textContent = message;
      list.append(item);
    }
    return list;
  }

  function showErrors(errors) {
    clearErrors();
    const note = document.createElement("p");
    note.className = "errornote certificate-check-error";
    note.textContent = "Please correct the errors below. Nothing was saved; your files and key are still here.";
    const first = form.querySelector("fieldset");
    const unplaced = [];
    for (const [name, messages] of Object.entries(errors)) {
      const row = name === "__all__" ? null : form.querySelector(`.form-row.field-${CSS.escape(name)}`);
      if (!row) {
        unplaced.push(...messages);
        continue;
      }
      row.classList.add("errors", "certificate-check-errors");
      row.prepend(errorList(messages, ""));
    }
    first.before(note);
    if (unplaced.length) first.before(errorList(unplaced, "nonfield"));
    note.scrollIntoView({block: "start"});
  }

  form.addEventListener("submit", async (event) => {
    if (checked) return;  // checked already: this is the real submit
    event.preventDefault();
    const submitter = event.submitter;
    let errors = null;
    try {
      const response = await fetch(check.dataset.url, {
        method: "POST", body: new FormData(form), credentials: "same-origin",
        headers: {"Accept": "application/json"},
      });
      if (response.ok) errors = (await response.json()).errors;
    } catch (error) {
      // Unreachable: the server validates on submit anyway.
    }
    if (errors && Object.keys(errors).length) {
      showErrors(errors);
      return;
    }
    checked = true;
    form.requestSubmit(submitter);
  });
})();
