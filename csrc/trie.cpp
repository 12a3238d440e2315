#include "trie.h"

#include <algorithm>
#include <numeric>

namespace latentr3 {

namespace {

std::string at_pos(const char* arg, int64_t i) {
  return std::string(arg) + "[" + std::to_string(i) + "]";
}

}  // namespace

ItemTrie::ItemTrie(const int64_t* tokens, int64_t num_tokens, const int64_t* seq_offsets,
                   int64_t num_seqs, const int64_t* item_ids, int64_t vocab_size)
    : vocab_size_(vocab_size > 0 ? vocab_size : 0) {
  if (num_seqs <= 0) throw TrieInputError("ItemTrie: need at least one sequence, got 0");
  if (seq_offsets[0] != 0) throw TrieInputError("ItemTrie: seq_offsets[0] must be 0");
  if (seq_offsets[num_seqs] != num_tokens)
    throw TrieInputError("ItemTrie: seq_offsets[-1] = " + std::to_string(seq_offsets[num_seqs]) +
                         " does not match the number of tokens " + std::to_string(num_tokens));
  // Validate every offset before reading any token: bad offsets must never index tokens.
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t b = seq_offsets[s], e = seq_offsets[s + 1];
    if (e < b || e > num_tokens)
      throw TrieInputError("ItemTrie: offsets[" + std::to_string(s + 1) + "] = " +
                           std::to_string(e) + " is out of range [offsets[" + std::to_string(s) +
                           "] = " + std::to_string(b) + ", " + std::to_string(num_tokens) +
                           "] (offsets must be non-decreasing and end at the token count)");
  }
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t b = seq_offsets[s], e = seq_offsets[s + 1];
    if (e == b)
      throw TrieInputError("ItemTrie: sequence " + std::to_string(s) + " (item id " +
                           std::to_string(item_ids[s]) + ") is empty");
    if (item_ids[s] < 0)
      throw TrieInputError("ItemTrie: negative item id " + std::to_string(item_ids[s]) + " at " +
                           at_pos("item_ids", s));
    for (int64_t t = b; t < e; ++t) {
      if (tokens[t] < 0 || (vocab_size_ > 0 && tokens[t] >= vocab_size_))
        throw TrieInputError("ItemTrie: token id " + std::to_string(tokens[t]) + " at position " +
                             std::to_string(t - b) + " of sequence " + std::to_string(s) +
                             " is out of range [0, " +
                             (vocab_size_ > 0 ? std::to_string(vocab_size_) : "inf") + ")");
    }
  }
  {
    std::vector<int64_t> ids(item_ids, item_ids + num_seqs);
    std::sort(ids.begin(), ids.end());
    auto dup = std::adjacent_find(ids.begin(), ids.end());
    if (dup != ids.end())
      throw TrieInputError("ItemTrie: item id " + std::to_string(*dup) +
                           " appears more than once in item_ids");
  }

  // Lexicographic order of the sequences; stable so duplicate sequences keep input order.
  std::vector<int64_t> order(static_cast<size_t>(num_seqs));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return std::lexicographical_compare(tokens + seq_offsets[a], tokens + seq_offsets[a + 1],
                                        tokens + seq_offsets[b], tokens + seq_offsets[b + 1]);
  });

  // Walk the sorted sequences; each one adds nodes below its longest common prefix with the
  // previous one. Node ids come out in preorder and siblings in increasing token order.
  parents_.reserve(static_cast<size_t>(num_tokens) + 1);
  parent_tokens_.reserve(static_cast<size_t>(num_tokens) + 1);
  depths_.reserve(static_cast<size_t>(num_tokens) + 1);
  parents_.push_back(-1);
  parent_tokens_.push_back(-1);
  depths_.push_back(0);
  std::vector<int64_t> path(1, kRoot);  // path[d] = node at depth d on the previous sequence
  std::vector<int64_t> terminal_of(static_cast<size_t>(num_seqs));
  const int64_t* prev = nullptr;
  int64_t prev_len = 0;
  for (int64_t k = 0; k < num_seqs; ++k) {
    const int64_t s = order[static_cast<size_t>(k)];
    const int64_t* seq = tokens + seq_offsets[s];
    const int64_t len = seq_offsets[s + 1] - seq_offsets[s];
    int64_t lcp = 0;
    const int64_t lim = std::min(len, prev_len);
    while (lcp < lim && seq[lcp] == prev[lcp]) ++lcp;
    path.resize(static_cast<size_t>(len) + 1);
    for (int64_t d = lcp; d < len; ++d) {
      const int64_t node = static_cast<int64_t>(parents_.size());
      parents_.push_back(path[static_cast<size_t>(d)]);
      parent_tokens_.push_back(seq[d]);
      depths_.push_back(d + 1);
      path[static_cast<size_t>(d) + 1] = node;
    }
    terminal_of[static_cast<size_t>(k)] = path[static_cast<size_t>(len)];
    max_depth_ = std::max(max_depth_, len);
    prev = seq;
    prev_len = len;
  }

  const int64_t n_nodes = static_cast<int64_t>(parents_.size());
  child_offsets_.assign(static_cast<size_t>(n_nodes) + 1, 0);
  for (int64_t v = 1; v < n_nodes; ++v) ++child_offsets_[static_cast<size_t>(parents_[static_cast<size_t>(v)]) + 1];
  for (int64_t v = 0; v < n_nodes; ++v) {
    max_children_ = std::max(max_children_, child_offsets_[static_cast<size_t>(v) + 1]);
    child_offsets_[static_cast<size_t>(v) + 1] += child_offsets_[static_cast<size_t>(v)];
  }
  child_tokens_.resize(static_cast<size_t>(n_nodes) - 1);
  child_nodes_.resize(static_cast<size_t>(n_nodes) - 1);
  {
    std::vector<int64_t> cursor(child_offsets_.begin(), child_offsets_.end() - 1);
    for (int64_t v = 1; v < n_nodes; ++v) {  // preorder => siblings already sorted by token
      const int64_t e = cursor[static_cast<size_t>(parents_[static_cast<size_t>(v)])]++;
      child_tokens_[static_cast<size_t>(e)] = parent_tokens_[static_cast<size_t>(v)];
      child_nodes_[static_cast<size_t>(e)] = v;
    }
  }

  item_offsets_.assign(static_cast<size_t>(n_nodes) + 1, 0);
  for (int64_t k = 0; k < num_seqs; ++k) ++item_offsets_[static_cast<size_t>(terminal_of[static_cast<size_t>(k)]) + 1];
  for (int64_t v = 0; v < n_nodes; ++v)
    item_offsets_[static_cast<size_t>(v) + 1] += item_offsets_[static_cast<size_t>(v)];
  item_ids_.resize(static_cast<size_t>(num_seqs));
  {
    std::vector<int64_t> cursor(item_offsets_.begin(), item_offsets_.end() - 1);
    for (int64_t k = 0; k < num_seqs; ++k) {
      const int64_t e = cursor[static_cast<size_t>(terminal_of[static_cast<size_t>(k)])]++;
      item_ids_[static_cast<size_t>(e)] = item_ids[order[static_cast<size_t>(k)]];
    }
  }
}

void ItemTrie::check_states(const int64_t* states, int64_t n, const char* arg) const {
  const int64_t nn = num_nodes();
  for (int64_t i = 0; i < n; ++i)
    if (states[i] < 0 || states[i] >= nn)
      throw TrieInputError("ItemTrie: state " + std::to_string(states[i]) + " at " +
                           at_pos(arg, i) + " is out of range [0, " + std::to_string(nn) + ")");
}

void ItemTrie::allowed_offsets(const int64_t* states, int64_t n, int64_t* out_offsets) const {
  out_offsets[0] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const size_t s = static_cast<size_t>(states[i]);
    out_offsets[i + 1] = out_offsets[i] + child_offsets_[s + 1] - child_offsets_[s];
  }
}

void ItemTrie::allowed_fill(const int64_t* states, int64_t n, int64_t* out_tokens,
                            int64_t* out_children) const {
  int64_t pos = 0;
  for (int64_t i = 0; i < n; ++i) {
    const size_t s = static_cast<size_t>(states[i]);
    const int64_t b = child_offsets_[s], e = child_offsets_[s + 1];
    std::copy(child_tokens_.begin() + b, child_tokens_.begin() + e, out_tokens + pos);
    if (out_children != nullptr)
      std::copy(child_nodes_.begin() + b, child_nodes_.begin() + e, out_children + pos);
    pos += e - b;
  }
}

int64_t ItemTrie::max_allowed(const int64_t* states, int64_t n) const {
  int64_t w = 0;
  for (int64_t i = 0; i < n; ++i) {
    const size_t s = static_cast<size_t>(states[i]);
    w = std::max(w, child_offsets_[s + 1] - child_offsets_[s]);
  }
  return w;
}

void ItemTrie::allowed_padded(const int64_t* states, int64_t n, int64_t width, int64_t* out_tokens,
                              int64_t* out_children) const {
  for (int64_t i = 0; i < n; ++i) {
    const size_t s = static_cast<size_t>(states[i]);
    const int64_t b = child_offsets_[s], e = child_offsets_[s + 1];
    if (e - b > width)
      throw TrieInputError("ItemTrie.allowed_padded: state " + std::to_string(states[i]) + " has " +
                           std::to_string(e - b) + " children, more than width " +
                           std::to_string(width));
    int64_t* rt = out_tokens + i * width;
    int64_t* rc = out_children + i * width;
    std::copy(child_tokens_.begin() + b, child_tokens_.begin() + e, rt);
    std::copy(child_nodes_.begin() + b, child_nodes_.begin() + e, rc);
    std::fill(rt + (e - b), rt + width, -1);
    std::fill(rc + (e - b), rc + width, -1);
  }
}

int64_t ItemTrie::find_child(int64_t state, int64_t token) const {
  const auto first = child_tokens_.begin() + child_offsets_[static_cast<size_t>(state)];
  const auto last = child_tokens_.begin() + child_offsets_[static_cast<size_t>(state) + 1];
  const auto it = std::lower_bound(first, last, token);
  if (it == last || *it != token) return kMissing;
  return child_nodes_[static_cast<size_t>(it - child_tokens_.begin())];
}

void ItemTrie::advance(const int64_t* states, const int64_t* tokens, int64_t n, int64_t* out,
                       bool strict) const {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = find_child(states[i], tokens[i]);
    if (c == kMissing && strict)
      throw TrieInputError("ItemTrie.advance: no edge with token " + std::to_string(tokens[i]) +
                           " from state " + std::to_string(states[i]) + " (at " +
                           at_pos("tokens", i) + ")");
    out[i] = c;
  }
}

void ItemTrie::is_terminal(const int64_t* states, int64_t n, uint8_t* out) const {
  for (int64_t i = 0; i < n; ++i) {
    const size_t s = static_cast<size_t>(states[i]);
    out[i] = item_offsets_[s + 1] > item_offsets_[s] ? 1 : 0;
  }
}

void ItemTrie::depth(const int64_t* states, int64_t n, int64_t* out) const {
  for (int64_t i = 0; i < n; ++i) out[i] = depths_[static_cast<size_t>(states[i])];
}

}  // namespace latentr3
