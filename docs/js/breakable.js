// Long names in table cells (metric names, dotted paths, calls) may break
// after "_", ".", ",", "=", "(" or "/" -- never in the middle of a word -- so
// that a table fits the page instead of hiding its last column behind a
// scroll.  <wbr> adds a break opportunity and nothing to copied text.
(function () {
  function breakable(root) {
    root.querySelectorAll(".md-typeset table:not([class]) td code").forEach(function (code) {
      var text = code.textContent;
      if (text.length < 20 || code.children.length) return;
      code.textContent = "";
      text.split(/(?<=[_.,=(\/])/).forEach(function (part) {
        code.append(part, document.createElement("wbr"));
      });
    });
  }
  if (typeof document$ !== "undefined") {
    document$.subscribe(function () { breakable(document); });
  } else {
    document.addEventListener("DOMContentLoaded", function () { breakable(document); });
  }
})();
