// MathJax 3 configuration, read before assets/mathjax/tex-chtml.js (copied from the
// django-static-mathjax package at build time by docs/hooks/mathjax.py: no CDN). Only the
// spans pymdownx.arithmatex (generic) emits are typeset, with its \( \) and \[ \] delimiters.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};
