// Links into the Airflow UI (marked data-airflow-ui) open in the UI itself. When the UI shows this
// page in its frame (same origin), a plain link would load a second UI inside the frame, and the
// frame's sandbox forbids target="_top": the link is followed from the UI's own document instead.
// Anywhere else (the page opened on its own, a modified click), the link works as any link.
(function () {
  "use strict";
  document.addEventListener("click", function (event) {
    var link = event.target instanceof Element ? event.target.closest("a[data-airflow-ui]") : null;
    if (!link || event.defaultPrevented || event.button !== 0 ||
        event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) {
      return;
    }
    var top;
    try {
      top = window.top;
      if (top === window || top.location.origin !== window.location.origin) {
        return;
      }
      var outer = top.document.createElement("a");
      outer.href = link.href;
      outer.style.display = "none";
      top.document.body.appendChild(outer);
      event.preventDefault();
      outer.click();
      outer.remove();
    } catch (error) {
      // Not allowed to reach the UI's document: the link opens in the frame.
    }
  });
})();
