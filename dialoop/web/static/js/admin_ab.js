// The trainers' A/B page: a, b and t choose from the keyboard (not while typing a skip reason).

const keys = { a: "choose-a", b: "choose-b", t: "choose-tie" };

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target.closest("input, textarea, select")) return;
  const button = document.getElementById(keys[event.key.toLowerCase()] ?? "");
  if (!button) return;
  event.preventDefault();
  button.click();
});
