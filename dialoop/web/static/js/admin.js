// Admin pages: forms marked data-confirm ask before they submit (delete a user, cancel an iteration ...).

for (const form of document.querySelectorAll("form[data-confirm]")) {
  form.addEventListener("submit", (event) => {
    if (!window.confirm(form.dataset.confirm)) event.preventDefault();
  });
}
