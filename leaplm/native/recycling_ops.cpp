// Token Recycling's per-pass loops in C++ (leaplm/speculative/drafters/recycling.py holds the algorithm, its
// docstring and the Python reference these must equal; tests/native/test_recycling_ops.py compares them).
// In Python the two cost ~0.45 ms per target pass (small numpy calls and tuple hashing), ~5% of a SmolLM2
// int8 pass on a 2-core CPU; here a few microseconds.
//
// The drafter's tables stay numpy arrays owned by Python; `tables` passes them as tensors sharing their
// memory, in this order:
//   next_tokens [V, K] int32 (-1 = unseen), level [V] int8,
//   then per context length n = 2, 3, ...: keys [S] int64 (the uint64 gram hashes, 0 = empty),
//   rows [S, K] int32, level [S] int8 (-1 = a row seeded from the prompt); S a power of two.
// Gram hashes and slots are speculative/context_rows.py's: extend_hash(h, t) = (h * 0x100000001B3) ^ (t + 1)
// mod 2^64 folded from 0 over the gram; slot = (h * 0x9E3779B97F4A7C15 mod 2^64) >> (64 - log2 S).
//
// - recycle_observe(tables, prefix, fed, parents, ids, levels, contexts) -> int: the fed tokens' candidates
//   ids [n, K] go to the matrix (keyed by the token) and, when `contexts`, to the context rows (keyed by
//   each token's path: prefix, then its chain of fed ancestors; parents[i] < i, -1 = hangs off the prefix).
//   Every update reads the old state of all its entries before writing any (numpy's fancy-index update):
//   a token or slot met twice keeps the later write, with a level computed from the old one. Returns 0, or
//   (writing nothing) the number of matrix rows needed when a token or candidate lies past the matrix.
// - recycle_grow(tables, counts, tail, copy, cost, k, max_depth, patience, prompt_source, levels) -> [4, n]
//   int64 (tokens, parents, ranks, sources): TokenRecycling._grow_tree's best-first tree from the
//   context's last tokens `tail`, with the prompt-lookup `copy` as one more branch, cut by the cost table
//   `cost` [>= 1] float64. `counts` = (hits [sources, max_depth + 1, K + 1], visits [sources, max_depth + 1],
//   copy_visits [max_depth + 1]) float64: a rank-r candidate's rate is hits / visits of its source and
//   depth, a copy node's hits[0, depth, K] / copy_visits[depth] (TokenRecycling.acceptance).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <queue>
#include <vector>

namespace {

constexpr uint64_t kMult = 0x100000001B3ULL;
constexpr uint64_t kMix = 0x9E3779B97F4A7C15ULL;
constexpr int8_t kSeeded = -1;
constexpr int kMaxContext = 8;

inline uint64_t extend_hash(uint64_t h, int64_t token) { return (h * kMult) ^ static_cast<uint64_t>(token + 1); }

// A path's suffix hashes: h[o - 1] hashes its last o tokens, o = 1..len (len <= the longest context).
struct Suffix {
  uint64_t h[kMaxContext];
  int len = 0;
};

// `parent`'s suffixes extended by `token` (recycling._extend).
inline Suffix extend(const Suffix& parent, int64_t token, int context) {
  Suffix s;
  s.h[0] = extend_hash(0, token);
  s.len = std::min(parent.len + 1, context);
  for (int o = 1; o < s.len; ++o) s.h[o] = extend_hash(parent.h[o - 1], token);
  return s;
}

inline Suffix suffixes(const int64_t* tokens, int64_t n, int context) {
  Suffix s;
  for (int64_t i = std::max<int64_t>(0, n - context); i < n; ++i) s = extend(s, tokens[i], context);
  return s;
}

struct ContextTable {
  uint64_t* keys;
  int32_t* rows;
  int8_t* level;
  int shift;
  int order;
  int64_t slot(uint64_t h) const { return static_cast<int64_t>((h * kMix) >> shift); }
};

struct Tables {
  int32_t* next;
  int8_t* level;
  int64_t V, K;
  std::vector<ContextTable> ctx;   // orders 2, 3, ...
  int context() const { return 1 + static_cast<int>(ctx.size()); }
};

Tables unpack(at::TensorList t) {
  TORCH_CHECK(t.size() >= 2 && (t.size() - 2) % 3 == 0 && (t.size() - 2) / 3 + 1 <= kMaxContext,
              "recycling tables: next_tokens, level, then keys/rows/level per context length");
  auto check = [](const at::Tensor& x, at::ScalarType dtype, const char* what) {
    TORCH_CHECK(x.scalar_type() == dtype && x.is_contiguous() && x.device().is_cpu(), "recycling tables: ", what,
                " must be a contiguous CPU ", c10::toString(dtype), " tensor");
  };
  check(t[0], at::kInt, "next_tokens");
  check(t[1], at::kChar, "level");
  Tables T{t[0].data_ptr<int32_t>(), t[1].data_ptr<int8_t>(), t[0].size(0), t[0].size(1), {}};
  TORCH_CHECK(t[0].dim() == 2 && t[1].numel() == T.V, "recycling tables: level must have one entry per matrix row");
  for (size_t i = 2; i < t.size(); i += 3) {
    check(t[i], at::kLong, "keys");
    check(t[i + 1], at::kInt, "rows");
    check(t[i + 2], at::kChar, "row levels");
    const int64_t S = t[i].numel();
    TORCH_CHECK(S >= 2 && (S & (S - 1)) == 0 && t[i + 1].numel() == S * T.K && t[i + 2].numel() == S,
                "recycling tables: a context table has a power-of-two number of slots, K candidates each");
    int bits = 0;
    while ((int64_t{1} << bits) < S) ++bits;
    T.ctx.push_back(ContextTable{reinterpret_cast<uint64_t*>(t[i].data_ptr<int64_t>()), t[i + 1].data_ptr<int32_t>(),
                                 t[i + 2].data_ptr<int8_t>(), 64 - bits, static_cast<int>(T.ctx.size()) + 2});
  }
  return T;
}

inline int8_t settle(int8_t level, bool same_best, int64_t levels) {
  return same_best ? static_cast<int8_t>(std::min<int64_t>(level + 1, levels - 1)) : int8_t{0};
}

int64_t recycle_observe(at::TensorList tables, c10::ArrayRef<int64_t> prefix, c10::ArrayRef<int64_t> fed,
                        c10::ArrayRef<int64_t> parents, const at::Tensor& ids_t, int64_t levels, bool contexts) {
  const Tables T = unpack(tables);
  const int64_t n = static_cast<int64_t>(fed.size()), K = T.K;
  const at::Tensor ids = ids_t.to(at::kLong).contiguous();
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == n && ids.size(1) == K, "recycle_observe: ids must be [len(fed), ",
              K, "]");
  const int64_t* id = ids.data_ptr<int64_t>();
  int64_t need = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(fed[i] >= 0, "recycle_observe: negative token ", fed[i]);
    need = std::max(need, fed[i] + 1);
    for (int64_t r = 0; r < K; ++r) {
      TORCH_CHECK(id[i * K + r] >= -1, "recycle_observe: candidate ids must be >= -1");
      need = std::max(need, id[i * K + r] + 1);
    }
  }
  if (need > T.V) return need;
  if (contexts && !T.ctx.empty()) {
    TORCH_CHECK(static_cast<int64_t>(parents.size()) == n, "recycle_observe: one parent per fed token");
    const int C = T.context();
    const Suffix root = suffixes(prefix.data(), static_cast<int64_t>(prefix.size()), C);
    std::vector<Suffix> path(n);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(parents[i] >= -1 && parents[i] < i, "recycle_observe: parents must precede their children");
      path[i] = extend(parents[i] < 0 ? root : path[parents[i]], fed[i], C);
    }
    std::vector<int8_t> next_level(n);
    for (const ContextTable& t : T.ctx) {
      for (int64_t i = 0; i < n; ++i) {   // read every entry before writing any
        if (path[i].len < t.order) continue;
        const uint64_t h = path[i].h[t.order - 1];
        const int64_t s = t.slot(h);
        const bool same = t.keys[s] == h && t.rows[s * K] == id[i * K] && t.level[s] != kSeeded;
        next_level[i] = settle(t.level[s], same, levels);
      }
      for (int64_t i = 0; i < n; ++i) {
        if (path[i].len < t.order) continue;
        const uint64_t h = path[i].h[t.order - 1];
        const int64_t s = t.slot(h);
        t.level[s] = next_level[i];
        t.keys[s] = h;
        for (int64_t r = 0; r < K; ++r) t.rows[s * K + r] = static_cast<int32_t>(id[i * K + r]);
      }
    }
  }
  std::vector<int8_t> next_level(n);
  for (int64_t i = 0; i < n; ++i)
    next_level[i] = settle(T.level[fed[i]], T.next[fed[i] * K] == id[i * K], levels);
  for (int64_t i = 0; i < n; ++i) {
    T.level[fed[i]] = next_level[i];
    for (int64_t r = 0; r < K; ++r) T.next[fed[i] * K + r] = static_cast<int32_t>(id[i * K + r]);
  }
  return 0;
}

// A node's candidate row: the longest context with a row, else the matrix (TokenRecycling._row).
struct Row {
  const int32_t* tokens = nullptr;
  int64_t source = 0;
};

Row find_row(const Tables& T, const Suffix& path, int64_t token, int64_t prompt_source, int64_t levels) {
  for (auto t = T.ctx.rbegin(); t != T.ctx.rend(); ++t) {
    if (path.len < t->order) continue;
    const uint64_t h = path.h[t->order - 1];
    const int64_t s = t->slot(h);
    if (h != 0 && t->keys[s] == h) {
      const int8_t level = t->level[s];
      return {t->rows + s * T.K, level == kSeeded ? prompt_source : (t->order - 1) * levels + level};
    }
  }
  if (token < 0 || token >= T.V) return {};
  return {T.next + token * T.K, T.level[token]};
}

struct Entry {          // a candidate node waiting in the best-first heap
  double neg;           // -(parent score x acceptance rate)
  int64_t order;        // insertion order: ties pop first-in first
  int64_t parent, depth, rank;
  double base;          // the parent's score
  Row row;              // its row (row.tokens == nullptr: a copy node)
  int64_t copy_index;
};

struct Later {
  bool operator()(const Entry& a, const Entry& b) const {
    return a.neg > b.neg || (a.neg == b.neg && a.order > b.order);
  }
};

at::Tensor recycle_grow(at::TensorList tables, at::TensorList counts, c10::ArrayRef<int64_t> tail,
                        c10::ArrayRef<int64_t> copy, const at::Tensor& cost_t, int64_t k, int64_t max_depth,
                        int64_t patience, int64_t prompt_source, int64_t levels) {
  const Tables T = unpack(tables);
  const int64_t K = T.K, D1 = max_depth + 1;
  TORCH_CHECK(counts.size() == 3, "recycle_grow: counts are hits, visits, copy_visits");
  for (const at::Tensor& c : counts)
    TORCH_CHECK(c.scalar_type() == at::kDouble && c.is_contiguous() && c.device().is_cpu(),
                "recycle_grow: counts must be contiguous CPU float64 tensors");
  const int64_t sources = counts[1].numel() / D1;
  TORCH_CHECK(counts[0].numel() == sources * D1 * (K + 1) && counts[1].numel() == sources * D1 &&
                  counts[2].numel() == D1,
              "recycle_grow: counts must be hits [sources, max_depth + 1, top_k + 1], visits [sources, max_depth + 1], "
              "copy_visits [max_depth + 1]");
  TORCH_CHECK(prompt_source >= 0 && prompt_source < sources && (T.context() - 1) * levels + levels <= sources,
              "recycle_grow: the rate table has too few sources");
  TORCH_CHECK(cost_t.scalar_type() == at::kDouble && cost_t.is_contiguous() && cost_t.numel() >= 1,
              "recycle_grow: cost must be a contiguous float64 tensor");
  const double* hits = counts[0].data_ptr<double>();
  const double* visits = counts[1].data_ptr<double>();
  const double* copy_visits = counts[2].data_ptr<double>();
  const double* cost = cost_t.data_ptr<double>();
  const int64_t ncost = cost_t.numel();
  auto rate = [&](int64_t source, int64_t depth, int64_t rank) {
    return rank < K ? hits[(source * D1 + depth) * (K + 1) + rank] / visits[source * D1 + depth]
                    : hits[depth * (K + 1) + K] / copy_visits[depth];
  };
  const int C = T.context();
  const Suffix root = suffixes(tail.data(), static_cast<int64_t>(tail.size()), C);
  std::vector<int64_t> tokens, parents, ranks, srcs;
  std::vector<Suffix> paths;
  std::priority_queue<Entry, std::vector<Entry>, Later> heap;
  int64_t order = 0;
  auto offer_candidate = [&](int64_t parent, int64_t depth, int64_t rank, double base, Row row) {
    if (row.tokens == nullptr || depth > max_depth || rank >= K || row.tokens[rank] < 0) return;
    ++order;
    heap.push(Entry{-base * rate(row.source, depth, rank), order, parent, depth, rank, base, row, -1});
  };
  auto offer_copy = [&](int64_t parent, int64_t i, int64_t depth, double base) {
    if (i >= static_cast<int64_t>(copy.size())) return;
    ++order;
    heap.push(Entry{-base * rate(0, std::min(depth, max_depth), K), order, parent, depth, K, base, Row{}, i});
  };
  if (!tail.empty()) offer_candidate(-1, 1, 0, 1.0, find_row(T, root, tail.back(), prompt_source, levels));
  offer_copy(-1, 0, 1, 1.0);
  // PrefixChooser: the node count with the best expected tokens per unit of pass time so far
  int64_t best_n = 0;
  double gain = 1.0, best_rate = 1.0;
  const int64_t limit = std::min(k, ncost - 1);
  while (!heap.empty() && static_cast<int64_t>(tokens.size()) < limit &&
         static_cast<int64_t>(tokens.size()) - best_n < patience) {
    const Entry e = heap.top();
    heap.pop();
    const bool is_copy = e.row.tokens == nullptr;
    const int64_t token = is_copy ? copy[e.copy_index] : e.row.tokens[e.rank];
    if (!is_copy) offer_candidate(e.parent, e.depth, e.rank + 1, e.base, e.row);   // the row's next candidate
    int64_t node = -1;
    for (size_t j = 0; j < tokens.size(); ++j)
      if (parents[j] == e.parent && tokens[j] == token) node = static_cast<int64_t>(j);
    if (node >= 0) {    // already in the tree through the other source: merge
      if (is_copy) offer_copy(node, e.copy_index + 1, e.depth + 1, -e.neg);
      continue;
    }
    node = static_cast<int64_t>(tokens.size());
    tokens.push_back(token);
    parents.push_back(e.parent);
    ranks.push_back(e.rank);
    srcs.push_back(is_copy ? 0 : e.row.source);
    gain += -e.neg;
    const int64_t n = static_cast<int64_t>(tokens.size());
    if (gain / cost[n] > best_rate) best_rate = gain / cost[n], best_n = n;
    paths.push_back(extend(e.parent < 0 ? root : paths[e.parent], token, C));
    offer_candidate(node, e.depth + 1, 0, -e.neg, find_row(T, paths[node], token, prompt_source, levels));
    if (is_copy) offer_copy(node, e.copy_index + 1, e.depth + 1, -e.neg);
  }
  at::Tensor out = at::empty({4, best_n}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t j = 0; j < best_n; ++j)
    o[j] = tokens[j], o[best_n + j] = parents[j], o[2 * best_n + j] = ranks[j], o[3 * best_n + j] = srcs[j];
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leaplm_native, m) {
  m.def("recycle_observe(Tensor[] tables, int[] prefix, int[] fed, int[] parents, Tensor ids, int levels, "
        "bool contexts) -> int", &recycle_observe);
  m.def("recycle_grow(Tensor[] tables, Tensor[] counts, int[] tail, int[] copy, Tensor cost, int k, "
        "int max_depth, int patience, int prompt_source, int levels) -> Tensor", &recycle_grow);
}
