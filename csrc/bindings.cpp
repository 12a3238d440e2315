// Temporary module body; replaced by the item trie (csrc/trie.*).
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_C, m) { m.attr("__version__") = "0.1.0"; }
