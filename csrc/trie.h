// Item trie over token-id sequences, stored as flat CSR arrays (no per-node heap objects).
//
// Node 0 is the root. Node ids are assigned in depth-first (lexicographic) order of the sorted
// sequences. Children of node n are edges [child_offsets[n], child_offsets[n+1]) with tokens in
// strictly increasing order, so a transition is a binary search. A node is terminal when at least
// one sequence ends there; its item ids are items [item_offsets[n], item_offsets[n+1]) in input
// order (duplicate sequences share one path and one terminal).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace latentr3 {

// Bad input (empty sequence, negative/out-of-range ids or states, missing edge, length mismatch).
class TrieInputError : public std::invalid_argument {
 public:
  explicit TrieInputError(const std::string& msg) : std::invalid_argument(msg) {}
};

class ItemTrie {
 public:
  // tokens: concatenation of all sequences; seq_offsets: [num_seqs + 1], seq_offsets[0] == 0;
  // item_ids: [num_seqs]. vocab_size <= 0 means "no upper bound on token ids".
  ItemTrie(const int64_t* tokens, int64_t num_tokens, const int64_t* seq_offsets, int64_t num_seqs,
           const int64_t* item_ids, int64_t vocab_size);

  static constexpr int64_t kRoot = 0;
  static constexpr int64_t kMissing = -1;

  int64_t num_nodes() const { return static_cast<int64_t>(child_offsets_.size()) - 1; }
  int64_t num_edges() const { return static_cast<int64_t>(child_tokens_.size()); }
  int64_t num_items() const { return static_cast<int64_t>(item_ids_.size()); }
  int64_t max_depth() const { return max_depth_; }
  int64_t max_children() const { return max_children_; }
  int64_t vocab_size() const { return vocab_size_; }

  // Throws TrieInputError naming `arg` and the position when any state is out of range.
  void check_states(const int64_t* states, int64_t n, const char* arg) const;

  // Number of allowed tokens per state; out_offsets has n + 1 entries.
  void allowed_offsets(const int64_t* states, int64_t n, int64_t* out_offsets) const;
  // Fills tokens (and child node ids when out_children != nullptr) per the offsets above.
  void allowed_fill(const int64_t* states, int64_t n, int64_t* out_tokens,
                    int64_t* out_children) const;

  // Row i of the [n, width] outputs holds the allowed tokens / child nodes of states[i], padded
  // with -1. Throws when a state has more than `width` children.
  void allowed_padded(const int64_t* states, int64_t n, int64_t width, int64_t* out_tokens,
                      int64_t* out_children) const;
  // Largest child count among the given states.
  int64_t max_allowed(const int64_t* states, int64_t n) const;

  // Child of states[i] along tokens[i]; a missing edge throws (strict) or yields kMissing.
  void advance(const int64_t* states, const int64_t* tokens, int64_t n, int64_t* out,
               bool strict) const;
  void is_terminal(const int64_t* states, int64_t n, uint8_t* out) const;
  void depth(const int64_t* states, int64_t n, int64_t* out) const;

  const std::vector<int64_t>& child_offsets() const { return child_offsets_; }
  const std::vector<int64_t>& child_tokens() const { return child_tokens_; }
  const std::vector<int64_t>& child_nodes() const { return child_nodes_; }
  const std::vector<int64_t>& item_offsets() const { return item_offsets_; }
  const std::vector<int64_t>& item_ids() const { return item_ids_; }
  const std::vector<int64_t>& parents() const { return parents_; }
  const std::vector<int64_t>& parent_tokens() const { return parent_tokens_; }
  const std::vector<int64_t>& depths() const { return depths_; }

 private:
  int64_t find_child(int64_t state, int64_t token) const;

  std::vector<int64_t> child_offsets_;  // [num_nodes + 1]
  std::vector<int64_t> child_tokens_;   // [num_edges], sorted within each node
  std::vector<int64_t> child_nodes_;    // [num_edges]
  std::vector<int64_t> item_offsets_;   // [num_nodes + 1]
  std::vector<int64_t> item_ids_;       // [num_items]
  std::vector<int64_t> parents_;        // [num_nodes], -1 at the root
  std::vector<int64_t> parent_tokens_;  // [num_nodes], token on the edge into the node, -1 at root
  std::vector<int64_t> depths_;         // [num_nodes]
  int64_t max_depth_ = 0;
  int64_t max_children_ = 0;
  int64_t vocab_size_ = 0;
};

}  // namespace latentr3
