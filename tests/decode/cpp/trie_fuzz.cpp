// Randomized C++ test of csrc/trie.* (built with ASan + UBSan by tests/decode/test_trie_cpp.py).
#include "trie.h"
#include <random>
#include <map>
#include <cassert>
#include <cstdio>
using namespace latentr3;
int main() {
  std::mt19937_64 rng(1);
  for (int it = 0; it < 300; ++it) {
    int n = 1 + rng() % 200, vocab = 2 + rng() % 50;
    std::vector<int64_t> toks, off{0}, ids;
    std::map<std::vector<int64_t>, std::vector<int64_t>> ref;
    for (int i = 0; i < n; ++i) {
      int len = 1 + rng() % 8; std::vector<int64_t> s;
      for (int j = 0; j < len; ++j) s.push_back(rng() % vocab);
      toks.insert(toks.end(), s.begin(), s.end()); off.push_back((int64_t)toks.size()); ids.push_back(i);
      ref[s].push_back(i);
    }
    ItemTrie t(toks.data(), (int64_t)toks.size(), off.data(), n, ids.data(), vocab);
    for (auto& [s, its] : ref) {
      int64_t st = 0;
      for (auto x : s) { int64_t o; t.advance(&st, &x, 1, &o, true); st = o; }
      auto b = t.item_offsets()[st], e = t.item_offsets()[st + 1];
      assert(std::vector<int64_t>(t.item_ids().begin() + b, t.item_ids().begin() + e) == its);
    }
    std::vector<int64_t> states(t.num_nodes()); for (int64_t i = 0; i < t.num_nodes(); ++i) states[i] = i;
    std::vector<int64_t> o(states.size() + 1); t.allowed_offsets(states.data(), (int64_t)states.size(), o.data());
    std::vector<int64_t> tk(o.back()), ch(o.back()); t.allowed_fill(states.data(), (int64_t)states.size(), tk.data(), ch.data());
    int64_t w = t.max_allowed(states.data(), (int64_t)states.size());
    std::vector<int64_t> pt(states.size() * w), pc(states.size() * w);
    t.allowed_padded(states.data(), (int64_t)states.size(), w, pt.data(), pc.data());
    try { int64_t bad = vocab + 5, s0 = 0, out; t.advance(&s0, &bad, 1, &out, true); assert(false); } catch (const TrieInputError&) {}
  }
  std::puts("fuzz ok");
}
