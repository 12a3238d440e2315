// Python bindings of latentr3_fast._C: the item trie with a batched numpy API.
// Every query validates its input with the GIL held, then runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "trie.h"

namespace py = pybind11;
using latentr3::ItemTrie;
using latentr3::TrieInputError;

namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

const int64_t* data_1d(const I64Array& a, const char* arg) {
  if (a.ndim() != 1)
    throw TrieInputError(std::string("ItemTrie: ") + arg + " must be 1-D, got " +
                         std::to_string(a.ndim()) + " dimensions");
  return a.data();
}

I64Array new_i64(int64_t n) { return I64Array(static_cast<py::ssize_t>(n)); }

I64Array vec_to_array(const std::vector<int64_t>& v) {
  I64Array out = new_i64(static_cast<int64_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

class PyTrie {
 public:
  PyTrie(const I64Array& tokens, const I64Array& offsets, const I64Array& item_ids,
         int64_t vocab_size) {
    const int64_t* t = data_1d(tokens, "tokens");
    const int64_t* o = data_1d(offsets, "offsets");
    const int64_t* ids = data_1d(item_ids, "item_ids");
    const int64_t n = static_cast<int64_t>(item_ids.size());
    if (static_cast<int64_t>(offsets.size()) != n + 1)
      throw TrieInputError("ItemTrie: offsets has " + std::to_string(offsets.size()) +
                           " entries, expected len(item_ids) + 1 = " + std::to_string(n + 1));
    const int64_t nt = static_cast<int64_t>(tokens.size());
    py::gil_scoped_release nogil;
    trie_ = std::make_shared<ItemTrie>(t, nt, o, n, ids, vocab_size);
  }

  py::tuple allowed(const I64Array& states, bool return_children) const {
    const int64_t* s = data_1d(states, "states");
    const int64_t n = static_cast<int64_t>(states.size());
    trie_->check_states(s, n, "states");
    I64Array offsets = new_i64(n + 1);
    int64_t* po = offsets.mutable_data();
    {
      py::gil_scoped_release nogil;
      trie_->allowed_offsets(s, n, po);
    }
    I64Array tokens = new_i64(po[n]);
    I64Array children = new_i64(return_children ? po[n] : 0);
    int64_t* pt = tokens.mutable_data();
    int64_t* pc = return_children ? children.mutable_data() : nullptr;
    {
      py::gil_scoped_release nogil;
      trie_->allowed_fill(s, n, pt, pc);
    }
    if (return_children) return py::make_tuple(offsets, tokens, children);
    return py::make_tuple(offsets, tokens);
  }

  py::tuple allowed_padded(const I64Array& states, int64_t width) const {
    const int64_t* s = data_1d(states, "states");
    const int64_t n = static_cast<int64_t>(states.size());
    trie_->check_states(s, n, "states");
    if (width < 0) width = trie_->max_allowed(s, n);
    I64Array tokens({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(width)});
    I64Array children({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(width)});
    int64_t* pt = tokens.mutable_data();
    int64_t* pc = children.mutable_data();
    {
      py::gil_scoped_release nogil;
      trie_->allowed_padded(s, n, width, pt, pc);
    }
    return py::make_tuple(tokens, children);
  }

  I64Array advance(const I64Array& states, const I64Array& tokens, bool strict) const {
    const int64_t* s = data_1d(states, "states");
    const int64_t* t = data_1d(tokens, "tokens");
    if (states.size() != tokens.size())
      throw TrieInputError("ItemTrie.advance: states has " + std::to_string(states.size()) +
                           " entries but tokens has " + std::to_string(tokens.size()));
    const int64_t n = static_cast<int64_t>(states.size());
    trie_->check_states(s, n, "states");
    I64Array out = new_i64(n);
    int64_t* po = out.mutable_data();
    py::gil_scoped_release nogil;
    trie_->advance(s, t, n, po, strict);
    return out;
  }

  py::array_t<bool> is_terminal(const I64Array& states) const {
    const int64_t* s = data_1d(states, "states");
    const int64_t n = static_cast<int64_t>(states.size());
    trie_->check_states(s, n, "states");
    py::array_t<bool> out(static_cast<py::ssize_t>(n));
    static_assert(sizeof(bool) == sizeof(uint8_t), "bool must be one byte");
    auto* po = reinterpret_cast<uint8_t*>(out.mutable_data());
    py::gil_scoped_release nogil;
    trie_->is_terminal(s, n, po);
    return out;
  }

  I64Array depth(const I64Array& states) const {
    const int64_t* s = data_1d(states, "states");
    const int64_t n = static_cast<int64_t>(states.size());
    trie_->check_states(s, n, "states");
    I64Array out = new_i64(n);
    int64_t* po = out.mutable_data();
    py::gil_scoped_release nogil;
    trie_->depth(s, n, po);
    return out;
  }

  I64Array items(int64_t state) const {
    trie_->check_states(&state, 1, "state");
    const auto& off = trie_->item_offsets();
    const auto& ids = trie_->item_ids();
    const auto b = off[static_cast<size_t>(state)], e = off[static_cast<size_t>(state) + 1];
    I64Array out = new_i64(e - b);
    std::copy(ids.begin() + b, ids.begin() + e, out.mutable_data());
    return out;
  }

  py::dict to_csr() const {
    py::dict d;
    d["child_offsets"] = vec_to_array(trie_->child_offsets());
    d["child_tokens"] = vec_to_array(trie_->child_tokens());
    d["child_nodes"] = vec_to_array(trie_->child_nodes());
    d["item_offsets"] = vec_to_array(trie_->item_offsets());
    d["item_ids"] = vec_to_array(trie_->item_ids());
    d["parents"] = vec_to_array(trie_->parents());
    d["parent_tokens"] = vec_to_array(trie_->parent_tokens());
    d["depths"] = vec_to_array(trie_->depths());
    return d;
  }

  const ItemTrie& trie() const { return *trie_; }

 private:
  std::shared_ptr<const ItemTrie> trie_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "latentr3_fast C++ core: the item trie for catalogue-constrained decoding.";
  m.attr("__version__") = "0.1.0";
  py::register_exception<TrieInputError>(m, "TrieError", PyExc_ValueError);

  py::class_<PyTrie>(m, "ItemTrie")
      .def(py::init<const I64Array&, const I64Array&, const I64Array&, int64_t>(),
           py::arg("tokens"), py::arg("offsets"), py::arg("item_ids"), py::arg("vocab_size") = 0,
           "Build from flat tokens, sequence offsets [n+1] and item ids [n].")
      .def("root", [](const PyTrie&) { return ItemTrie::kRoot; })
      .def_property_readonly("num_nodes", [](const PyTrie& t) { return t.trie().num_nodes(); })
      .def_property_readonly("num_edges", [](const PyTrie& t) { return t.trie().num_edges(); })
      .def_property_readonly("num_items", [](const PyTrie& t) { return t.trie().num_items(); })
      .def_property_readonly("max_depth", [](const PyTrie& t) { return t.trie().max_depth(); })
      .def_property_readonly("max_children",
                             [](const PyTrie& t) { return t.trie().max_children(); })
      .def_property_readonly("vocab_size", [](const PyTrie& t) { return t.trie().vocab_size(); })
      .def("allowed", &PyTrie::allowed, py::arg("states"), py::arg("return_children") = false)
      .def("allowed_padded", &PyTrie::allowed_padded, py::arg("states"), py::arg("width") = -1)
      .def("advance", &PyTrie::advance, py::arg("states"), py::arg("tokens"),
           py::arg("strict") = true)
      .def("is_terminal", &PyTrie::is_terminal, py::arg("states"))
      .def("depth", &PyTrie::depth, py::arg("states"))
      .def("items", &PyTrie::items, py::arg("state"))
      .def("to_csr", &PyTrie::to_csr);
}
