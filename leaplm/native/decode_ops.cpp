// Native CPU operators of leaplm's CPU decode path, built at first use by leaplm/native/__init__.py:
// leaplm's int8 and int4 GEMMs (quant/int8.py, quant/int4.py; eager and compiled alike) and the compiled
// step's attention (models/compiled.py), which replaced Python custom ops costing ~40-200 us of
// interpreter work per call.
//
// - leaplm_native::int8_linear(x [M, K], qweight, wscale, comp, out) -> [M, out]: int8 weights per output
//   channel, activations quantized to int8 per row (layout and arithmetic: the int8 section below).
// - leaplm_native::int4_linear(x [M, K], qweight, scale, minv, out) -> [M, out]: 4-bit weights in groups of
//   32, activations quantized to int8 per row and group (the int4 section below).
// - leaplm_native::attend(q [1, N, H, D], k, v [1, N, KV, D], layer, kind) -> [1, N, H * D]: writes the
//   step's keys/values into the KV cache bound by bind_step and attends. Every query is computed on its
//   own over exactly the slots it sees (a range of committed slots, then its tree ancestors in depth
//   order), by the same loop whatever N is, so a row's result does not depend on the other rows or on
//   how many draft tokens share the pass: speculation reproduces single-token decoding bit for bit.
// - leaplm_native::row_topk(x [N, V], k) -> [N, k] int64: the k largest of each row, largest first, ties in
//   index order (k = 1: torch.argmax) — verification's argmax and Token Recycling's candidates.
//
// Both GEMMs are batch-invariant the same way: a row's integer dot products are exact and its float
// steps run in a fixed order, whatever M is and whichever thread computes it.
//
// The step geometry (cache tensors, slot of each fed token, per-query spans) is bound once per step by
// bind_step (a [B, KV, capacity, D] cache, row b's slot j = position j) or bind_paged (one pool of fixed-size
// blocks shared by many sequences, each with its block table: leaplm/engine/), per thread (as Python's
// `compiled.active`). Each query's key slots are resolved once there, not per layer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

// ------------------------------------------------------------------------------------------ int8 GEMM
// Weights [N, K] int8 per output row (w = q * wscale[o], q in -127..127), packed in blocks of 16 outputs:
// qweight [N / 16, K / 4, 64] bytes laid out [output 0..15][t 0..3] = q[o][4i + t] (K and N zero-padded to
// multiples of 4 and 16), so one 512-bit load holds 4 consecutive inputs of 16 outputs and one VNNI step
// (u8 activations x s8 weights) advances 16 outputs by 4 inputs with no horizontal sums. Activations are
// quantized per row: xq = round(x / xs) in [-127, 127], xs = max|x| / 127, fed as xq + 128 (u8); the
// kernel subtracts comp[o] = 128 * sum_k q[o][k]. Per row and output:
//   y = float(sum_k (xq_k + 128) q_k - comp) * (xs * wscale)
// The integer sum is exact whatever order it is formed in and the float steps are fixed, so a row's
// result depends neither on the other rows (batch invariance) nor on the thread computing it.

// Activations of all M rows as int32 words of 4 bytes (xq + 128 each): word (m, i) (inputs 4i..4i+3 of row
// m) at q[m * row_words + i * quad_words]. The VNNI loop reads them interleaved per quad of inputs (row
// words 1, quad words M: a row group's broadcasts share one pointer), the AMX loop row-major (row words
// K4, quad words 1). Rows Mp > M (AMX tile padding) and padding inputs hold xq = 0; xs [M]. Returns the
// words' start in `buf`, 64-byte aligned (so a 64-byte tile row is one cache line).
int32_t* quantize_rows8(const float* x, int64_t M, int64_t Mp, int64_t K, int64_t K4, int64_t row_words,
                        int64_t quad_words, std::vector<int32_t>& buf, std::vector<float>& xs) {
  buf.assign(static_cast<size_t>(Mp * K4 + 16), 0x80808080);
  int32_t* q = buf.data() + (16 - reinterpret_cast<uintptr_t>(buf.data()) % 64 / 4) % 16;
  xs.resize(M);
  uint8_t* qb = reinterpret_cast<uint8_t*>(q);
  at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, K)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * K;
      float amax = 0.f;
      int64_t k = 0;
#if defined(__AVX512F__)
      __m512 vmax = _mm512_setzero_ps();   // max is exact: any order gives the same amax
      for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
      amax = _mm512_reduce_max_ps(vmax);
#endif
      for (; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
      xs[m] = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      k = 0;
#if defined(__AVX512F__)
      // the same rounding as nearbyint (round to nearest even), 16 inputs = 4 words at a time
      const __m512 iv = _mm512_set1_ps(inv);
      for (; k + 16 <= K; k += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), iv));
        v = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(v, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127)),
                             _mm512_set1_epi32(128));
        alignas(16) int32_t words[4];
        _mm_store_si128(reinterpret_cast<__m128i*>(words), _mm512_cvtepi32_epi8(v));
        for (int w = 0; w < 4; ++w) q[m * row_words + (k / 4 + w) * quad_words] = words[w];
      }
#endif
      for (; k < K; ++k)
        qb[(m * row_words + (k / 4) * quad_words) * 4 + k % 4] =
            static_cast<uint8_t>(std::clamp(static_cast<int32_t>(std::nearbyint(xr[k] * inv)), -127, 127) + 128);
    }
  });
  return q;
}

// NB blocks of 16 outputs (the next one `bstride` bytes on) for R rows (their words at x[i * M + r]):
// integer sums out[r][16 * nb + o]. The sums are exact, so how rows and blocks are tiled changes nothing.
template <int R, int NB>
void int8_tile(const int8_t* qb, int64_t bstride, const int32_t* x, int64_t M, int64_t K4, int32_t out[][32]) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  constexpr int S = R * NB <= 2 ? 4 : (R * NB <= 4 ? 2 : 1);   // independent chains, to hide the latency
  __m512i acc[R][NB][S];
  for (int r = 0; r < R; ++r)
    for (int nb = 0; nb < NB; ++nb)
      for (int c = 0; c < S; ++c) acc[r][nb][c] = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + S <= K4; i += S) {
    for (int c = 0; c < S; ++c) {
      __m512i w[NB];
      for (int nb = 0; nb < NB; ++nb) w[nb] = _mm512_loadu_si512(qb + nb * bstride + (i + c) * 64);
      const int32_t* xi = x + (i + c) * M;
      for (int r = 0; r < R; ++r) {
        const __m512i xb = _mm512_set1_epi32(xi[r]);
        for (int nb = 0; nb < NB; ++nb) acc[r][nb][c] = _mm512_dpbusd_epi32(acc[r][nb][c], xb, w[nb]);
      }
    }
  }
  for (; i < K4; ++i) {
    __m512i w[NB];
    for (int nb = 0; nb < NB; ++nb) w[nb] = _mm512_loadu_si512(qb + nb * bstride + i * 64);
    const int32_t* xi = x + i * M;
    for (int r = 0; r < R; ++r) {
      const __m512i xb = _mm512_set1_epi32(xi[r]);
      for (int nb = 0; nb < NB; ++nb) acc[r][nb][0] = _mm512_dpbusd_epi32(acc[r][nb][0], xb, w[nb]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int nb = 0; nb < NB; ++nb) {
      __m512i s = acc[r][nb][0];
      for (int c = 1; c < S; ++c) s = _mm512_add_epi32(s, acc[r][nb][c]);
      _mm512_storeu_si512(out[r] + 16 * nb, s);
    }
#else
  const uint8_t* xb = reinterpret_cast<const uint8_t*>(x);
  for (int r = 0; r < R; ++r)
    for (int nb = 0; nb < NB; ++nb)
      for (int o = 0; o < 16; ++o) {
        int32_t s = 0;
        for (int64_t i = 0; i < K4; ++i)
          for (int t = 0; t < 4; ++t)
            s += static_cast<int32_t>(xb[(i * M + r) * 4 + t]) * qb[nb * bstride + i * 64 + o * 4 + t];
        out[r][16 * nb + o] = s;
      }
#endif
}

template <int NB, int RMAX>
void int8_rows(const int8_t* qb, int64_t bstride, const int32_t* x, int64_t M, int64_t n, int64_t K4,
               int32_t out[][32]) {
  switch (n) {
    case 1: int8_tile<1, NB>(qb, bstride, x, M, K4, out); break;
    case 2: int8_tile<2, NB>(qb, bstride, x, M, K4, out); break;
    case 3: int8_tile<3, NB>(qb, bstride, x, M, K4, out); break;
    case 4: int8_tile<4, NB>(qb, bstride, x, M, K4, out); break;
    case 5: int8_tile<5, NB>(qb, bstride, x, M, K4, out); break;
    case 6: int8_tile<6, NB>(qb, bstride, x, M, K4, out); break;
    case 7: int8_tile<7, NB>(qb, bstride, x, M, K4, out); break;
    case 8: int8_tile<8, NB>(qb, bstride, x, M, K4, out); break;
    case 9: int8_tile<9, NB>(qb, bstride, x, M, K4, out); break;
    case 10: int8_tile<10, NB>(qb, bstride, x, M, K4, out); break;
    case 11: int8_tile<11, NB>(qb, bstride, x, M, K4, out); break;
    case 12: int8_tile<12, NB>(qb, bstride, x, M, K4, out); break;
    case 13: if constexpr (RMAX >= 13) { int8_tile<13, NB>(qb, bstride, x, M, K4, out); } break;
    case 14: if constexpr (RMAX >= 14) { int8_tile<14, NB>(qb, bstride, x, M, K4, out); } break;
    case 15: if constexpr (RMAX >= 15) { int8_tile<15, NB>(qb, bstride, x, M, K4, out); } break;
    default: if constexpr (RMAX >= 16) { int8_tile<16, NB>(qb, bstride, x, M, K4, out); } break;
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define LEAPLM_AMX 1
// AMX (Sapphire Rapids and later): one TDPBUSD multiplies a 16 x 64 tile of u8 activations (16 rows,
// 64 inputs, row-major) by a 16 x 64-byte tile of s8 weights, which is exactly 16 quads of one packed
// block (the layout above: [quad][output][t]), into a 16 x 16 tile of int32 sums. It does 16x the
// multiply-adds of a VNNI step per instruction, so wide passes are no longer bound by multiply-adds
// (measured on SmolLM2's projections, 30 layers with a distinct weight each, so streamed from memory:
// 2 rows 1.12x, 4 rows 1.35x, 16 rows 1.66x the VNNI loop's speed; one row is still cheaper on VNNI).
// The sums are the same exact integers, so the two loops give bit-identical outputs and either may
// serve any call.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands a process the AMX register state only on request (arch_prctl ARCH_REQ_XCOMP_PERM).
bool amx_permitted() {
  static const bool ok = [] {
    const char* env = std::getenv("LEAPLM_AMX");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// Every tile 16 rows x 64 bytes: C[r][nb] = tiles 0..3 (2r + nb), A[r] = 4 + r, B[nb] = 6 + nb.
void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}

// RT tiles of 16 rows (xa: row-major u8, `xstride` bytes per row) x NB blocks (the next `bstride` bytes
// on) over K16 groups of 64 inputs: integer sums out[16 * r + i][16 * nb + o].
constexpr int64_t PF = 2;
template <int RT, int NB>
void int8_amx_tile(const int8_t* qb, int64_t bstride, const uint8_t* xa, int64_t xstride, int64_t K16,
                   int32_t out[][32]) {
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (RT == 2) _tile_zero(2);
  if constexpr (RT == 2 && NB == 2) _tile_zero(3);
  for (int64_t g = 0; g < K16; ++g) {
    for (int l = 0; l < 16; ++l) {   // the weight tiles PF groups ahead (a tile load alone waits on memory)
      _mm_prefetch(reinterpret_cast<const char*>(qb + (g + PF) * 1024 + 64 * l), _MM_HINT_T0);
      if constexpr (NB == 2) _mm_prefetch(reinterpret_cast<const char*>(qb + bstride + (g + PF) * 1024 + 64 * l), _MM_HINT_T0);
    }
    _tile_loadd(6, qb + g * 1024, 64);
    if constexpr (NB == 2) _tile_loadd(7, qb + bstride + g * 1024, 64);
    _tile_loadd(4, xa + g * 64, xstride);
    _tile_dpbusd(0, 4, 6);
    if constexpr (NB == 2) _tile_dpbusd(1, 4, 7);
    if constexpr (RT == 2) {
      _tile_loadd(5, xa + 16 * xstride + g * 64, xstride);
      _tile_dpbusd(2, 5, 6);
      if constexpr (NB == 2) _tile_dpbusd(3, 5, 7);
    }
  }
  _tile_stored(0, out[0], 128);
  if constexpr (NB == 2) _tile_stored(1, out[0] + 16, 128);
  if constexpr (RT == 2) _tile_stored(2, out[16], 128);
  if constexpr (RT == 2 && NB == 2) _tile_stored(3, out[16] + 16, 128);
}
#endif

// Whether this build and OS run the AMX loop (int8_linear uses it from amx_min_rows rows on).
bool int8_amx() {
#ifdef LEAPLM_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// From how many rows int8_linear takes the AMX loop. Measured on Sapphire Rapids, SmolLM2's
// projections per pass, 30 layers with a distinct weight each (streamed from memory, as in a real step), one
// process, loops alternated: ms AMX / VNNI at 1 row 8.61 / 7.30, 2 rows 7.43 / 8.34, 4 rows 7.39 /
// 10.01, 8 rows 9.35 / 12.64, 16 rows 10.24 / 16.96. (An earlier A/B reused one weight per shape, which
// stayed in cache and favoured the VNNI loop up to 5 rows.) Settable, for tests that run both loops on
// the same input and for benchmarks; returns the previous value.
std::atomic<int64_t> amx_min_rows{2};

int64_t int8_amx_min_rows(int64_t rows) { return amx_min_rows.exchange(rows); }

// Whether this build has the VNNI loop (else the portable one runs: correct, far slower than fbgemm).
bool int8_vnni() {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  return true;
#else
  return false;
#endif
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& wscale,
                        const at::Tensor& comp, int64_t out_features) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "int8_linear: x must be float32 [M, K]");
  TORCH_CHECK(qweight.dim() == 3 && qweight.scalar_type() == at::kChar && qweight.is_contiguous() &&
                  qweight.size(2) == 64,
              "int8_linear: qweight must be contiguous int8 [N / 16, K / 4, 64]");
  const int64_t M = x_in.size(0), K = x_in.size(1), blocks = qweight.size(0), K4 = qweight.size(1);
  const int64_t N = out_features;
  TORCH_CHECK(K <= K4 * 4 && K > K4 * 4 - 64, "int8_linear: x has ", K, " columns; the weight was packed for ",
              K4 * 4);
  TORCH_CHECK(N > (blocks - 1) * 16 && N <= blocks * 16, "int8_linear: ", N, " outputs do not fit ", blocks,
              " blocks of 16");
  TORCH_CHECK(wscale.scalar_type() == at::kFloat && wscale.is_contiguous() && wscale.numel() == blocks * 16 &&
                  comp.scalar_type() == at::kInt && comp.is_contiguous() && comp.numel() == blocks * 16,
              "int8_linear: wscale (float32) and comp (int32) must hold ", blocks * 16, " values");
  at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const int8_t* qp = qweight.data_ptr<int8_t>();
  const float* ws = wscale.data_ptr<float>();
  const int32_t* cp = comp.data_ptr<int32_t>();
  std::vector<int32_t> xbuf;
  std::vector<float> xs;
  // rows [m0, m0 + n) of the nb blocks from block b: y = float(isum - comp) * (xs * wscale)
  auto epilogue = [&](const int32_t (*isum)[32], int64_t b, int64_t nb, int64_t m0, int64_t n) {
    const int64_t valid = std::min<int64_t>(16 * nb, N - b * 16);
    for (int64_t r = 0; r < n; ++r) {
      const float scale = xs[m0 + r];
      float* yr = yp + (m0 + r) * N + b * 16;
      int64_t o = 0;
#if defined(__AVX512F__)
      const __m512 sv = _mm512_set1_ps(scale);
      for (; o < valid; o += 16) {   // the scalar loop's operations, 16 lanes at a time
        const __mmask16 mask = static_cast<__mmask16>(valid - o >= 16 ? 0xFFFF : (1u << (valid - o)) - 1);
        const __m512i d = _mm512_sub_epi32(_mm512_loadu_si512(isum[r] + o), _mm512_loadu_si512(cp + b * 16 + o));
        _mm512_mask_storeu_ps(yr + o, mask, _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sv, _mm512_loadu_ps(ws + b * 16 + o))));
      }
#endif
      for (; o < valid; ++o) yr[o] = static_cast<float>(isum[r][o] - cp[b * 16 + o]) * (scale * ws[b * 16 + o]);
    }
  };
#ifdef LEAPLM_AMX
  if (M >= amx_min_rows.load() && K4 % 16 == 0 && amx_permitted()) {
    const int64_t Mp = (M + 15) / 16 * 16, tiles = (blocks + 1) / 2;
    const uint8_t* xa = reinterpret_cast<const uint8_t*>(quantize_rows8(x.data_ptr<float>(), M, Mp, K, K4, K4, 1, xbuf, xs));
    const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, K * Mp));
    at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
      alignas(64) int32_t isum[32][32];
      amx_configure();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = 2 * t, nb = std::min<int64_t>(2, blocks - b);
        const int8_t* qb = qp + b * K4 * 64;
        for (int64_t m0 = 0; m0 < M; m0 += 32) {
          const uint8_t* xr = xa + m0 * K4 * 4;
          const bool two_rows = M - m0 > 16;
          if (nb == 2 && two_rows) int8_amx_tile<2, 2>(qb, K4 * 64, xr, K4 * 4, K4 / 16, isum);
          else if (nb == 2) int8_amx_tile<1, 2>(qb, K4 * 64, xr, K4 * 4, K4 / 16, isum);
          else if (two_rows) int8_amx_tile<2, 1>(qb, K4 * 64, xr, K4 * 4, K4 / 16, isum);
          else int8_amx_tile<1, 1>(qb, K4 * 64, xr, K4 * 4, K4 / 16, isum);
          epilogue(isum, b, nb, m0, std::min<int64_t>(32, M - m0));
        }
      }
      _tile_release();
    });
    return y;
  }
#endif
  const int32_t* xq = quantize_rows8(x.data_ptr<float>(), M, M, K, K4, 1, M, xbuf, xs);
  // up to 16 rows share each weight load (one block of 16 outputs); for wide inputs two blocks share
  // each activation broadcast (12 rows x 2 blocks), halving the broadcasts per VNNI step
  const int64_t NB = M > 16 ? 2 : 1, RM = NB == 2 ? 12 : 16;
  const int64_t tiles = (blocks + NB - 1) / NB;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, K * M * NB));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    alignas(64) int32_t isum[16][32];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t * NB, nb = std::min<int64_t>(NB, blocks - b);
      const int8_t* qb = qp + b * K4 * 64;
      for (int64_t m0 = 0; m0 < M; m0 += RM) {
        const int64_t n = std::min(RM, M - m0);
        const int32_t* xr = xq + m0;
        if (nb == 2) int8_rows<2, 12>(qb, K4 * 64, xr, M, n, K4, isum);
        else int8_rows<1, 16>(qb, K4 * 64, xr, M, n, K4, isum);
        epilogue(isum, b, nb, m0, n);
      }
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------------ int4 GEMM
// Weights [N, K] in groups of 32 along K: w = q * scale + minv, q in 0..15. Outputs are packed in blocks
// of 16 (N padded): per (block, group) 256 bytes laid out [i 0..3][output 0..15][t 0..3], byte = q[o][4i + t]
// | q[o][4(i + 4) + t] << 4, and scale/minv as float16 [block, group, 16] (GGUF's Q4_1 stores them so too). A 512-bit register then holds 4
// consecutive weights of 16 outputs, so one VNNI dot-product step (u8 weights x s8 activations) advances
// 16 outputs by 4 inputs with no horizontal sums. Activations are quantized per row and group:
// xq = round(x / xs) in [-127, 127], xs = max|x| / 127. For every output:
//   acc = fma(float(q . xq), scale * xs, acc); acc = fma(minv, xs * sum(xq), acc)     (group by group)
// The integer dot products are exact and the float steps run in this fixed order per row and output,
// in the vector and the scalar code alike: a row's result depends neither on the other rows (batch
// invariance) nor on the thread that computes it.
constexpr int64_t kGroup = 32;
constexpr int64_t kBlock = 16;
constexpr int64_t kRows = 8;   // rows sharing each unpacked weight group (8 accumulators + 8 weight registers)

struct QuantRow {
  std::vector<int8_t> q;      // [K]
  std::vector<float> xs;      // [G]
  std::vector<float> xsum;    // [G]: xs * sum(xq) over the group
};

void quantize_row(const float* x, int64_t K, QuantRow& r) {
  const int64_t G = K / kGroup;
  r.q.resize(K);
  r.xs.resize(G);
  r.xsum.resize(G);
  for (int64_t g = 0; g < G; ++g) {
    const float* xg = x + g * kGroup;
    float amax = 0.f;
    for (int64_t j = 0; j < kGroup; ++j) amax = std::max(amax, std::fabs(xg[j]));
    const float scale = amax / 127.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t j = 0; j < kGroup; ++j) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(xg[j] * inv));
      r.q[g * kGroup + j] = static_cast<int8_t>(std::clamp(v, -127, 127));
      sum += r.q[g * kGroup + j];
    }
    r.xs[g] = scale;
    r.xsum[g] = scale * static_cast<float>(sum);
  }
}

// one block of 16 outputs for rows[0 .. n): out[r][o]
void int4_rows(const uint8_t* qb, const uint16_t* sb, const uint16_t* mb, const QuantRow* rows, int64_t n, int64_t G,
               float out[kRows][kBlock]) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  __m512 acc[kRows];
  for (int64_t r = 0; r < n; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* p = qb + g * (kBlock * kGroup / 2);
    __m512i w[8];
    for (int i = 0; i < 4; ++i) {
      const __m512i v = _mm512_loadu_si512(p + 64 * i);
      w[i] = _mm512_and_si512(v, mask);
      w[i + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    }
    const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + g * kBlock)));
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mb + g * kBlock)));
    for (int64_t r = 0; r < n; ++r) {
      const int32_t* x4 = reinterpret_cast<const int32_t*>(rows[r].q.data() + g * kGroup);
      // four independent chains (integer sums are exact, so their order does not matter)
      __m512i c0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(x4[0]));
      __m512i c1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_set1_epi32(x4[1]));
      __m512i c2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[2], _mm512_set1_epi32(x4[2]));
      __m512i c3 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[3], _mm512_set1_epi32(x4[3]));
      c0 = _mm512_dpbusd_epi32(c0, w[4], _mm512_set1_epi32(x4[4]));
      c1 = _mm512_dpbusd_epi32(c1, w[5], _mm512_set1_epi32(x4[5]));
      c2 = _mm512_dpbusd_epi32(c2, w[6], _mm512_set1_epi32(x4[6]));
      c3 = _mm512_dpbusd_epi32(c3, w[7], _mm512_set1_epi32(x4[7]));
      const __m512i isum = _mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(sv, _mm512_set1_ps(rows[r].xs[g])), acc[r]);
      acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(rows[r].xsum[g]), acc[r]);
    }
  }
  for (int64_t r = 0; r < n; ++r) _mm512_storeu_ps(out[r], acc[r]);
#else
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t o = 0; o < kBlock; ++o) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* p = qb + g * (kBlock * kGroup / 2);
        const int8_t* x = rows[r].q.data() + g * kGroup;
        int32_t isum = 0;
        for (int64_t k = 0; k < kGroup; ++k) {
          const int64_t j = k / 4, t = k % 4;
          const uint8_t byte = p[(j % 4) * 64 + o * 4 + t];
          isum += (j < 4 ? (byte & 0x0F) : (byte >> 4)) * x[k];
        }
        const float sc = static_cast<float>(c10::Half(sb[g * kBlock + o], c10::Half::from_bits()));
        const float mn = static_cast<float>(c10::Half(mb[g * kBlock + o], c10::Half::from_bits()));
        acc = std::fma(static_cast<float>(isum), sc * rows[r].xs[g], acc);
        acc = std::fma(mn, rows[r].xsum[g], acc);
      }
      out[r][o] = acc;
    }
  }
#endif
}

at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scale,
                       const at::Tensor& minv, int64_t out_features) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "int4_linear: x must be float32 [M, K]");
  TORCH_CHECK(qweight.dim() == 3 && qweight.scalar_type() == at::kByte && qweight.is_contiguous() &&
                  qweight.size(2) == kBlock * kGroup / 2,
              "int4_linear: qweight must be contiguous uint8 [N / 16, K / 32, 256]");
  const int64_t M = x_in.size(0), K = x_in.size(1), blocks = qweight.size(0), G = qweight.size(1);
  const int64_t N = out_features;
  TORCH_CHECK(K == G * kGroup, "int4_linear: x has ", K, " columns; the weight was packed for ", G * kGroup,
              " (a multiple of 32)");
  TORCH_CHECK(N > (blocks - 1) * kBlock && N <= blocks * kBlock, "int4_linear: ", N, " outputs do not fit ",
              blocks, " blocks of 16");
  TORCH_CHECK(scale.dim() == 3 && scale.sizes() == minv.sizes() && scale.size(0) == blocks && scale.size(1) == G &&
                  scale.size(2) == kBlock && scale.is_contiguous() && minv.is_contiguous() &&
                  scale.scalar_type() == at::kHalf && minv.scalar_type() == at::kHalf,
              "int4_linear: scale and minv must be contiguous float16 [N / 16, K / 32, 16]");
  at::Tensor x = x_in.contiguous();
  std::vector<QuantRow> rows(M);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) quantize_row(xp + m * K, K, rows[m]);
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(minv.data_ptr<at::Half>());
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, K * M));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    alignas(64) float out[kRows][kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int64_t n = std::min(kRows, M - m0);
        int4_rows(qp + b * G * (kBlock * kGroup / 2), sp + b * G * kBlock, mp + b * G * kBlock, rows.data() + m0,
                  n, G, out);
        const int64_t valid = std::min(kBlock, N - b * kBlock);
        for (int64_t r = 0; r < n; ++r)
          std::memcpy(yp + (m0 + r) * N + b * kBlock, out[r], valid * sizeof(float));
      }
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------------ attention
struct Spans {            // per query n: the cache slots it attends over, in order (its committed run first)
  std::vector<std::vector<int64_t>> keys;
  std::vector<int64_t> lo;    // the first slot of its committed run (queries sharing it share those key reads)
  std::vector<int64_t> run;   // the length of that run: keys[n][0 .. run[n]) are the same for equal (group, lo)
};

struct Step {
  std::vector<at::Tensor> k, v;   // per layer [B, KV, capacity, D] float32, contiguous
  std::vector<int64_t> slots;     // [N]: the cache slot of each fed token
  std::vector<int64_t> row;       // [N]: the cache row (batch index) of each fed token
  std::vector<int64_t> group;     // [N]: queries of one sequence (row, or paged sequence) share a group
  Spans spans[2];                 // 0: full-attention layers, 1: sliding-window layers
  bool bound = false;
};

thread_local Step step;

std::vector<int64_t> to_vector(const at::Tensor& t) {
  at::Tensor c = t.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

void bind_caches(at::TensorList k, at::TensorList v, const char* who) {
  TORCH_CHECK(k.size() == v.size() && !k.empty(), who, ": one key and one value tensor per layer");
  step.k.assign(k.begin(), k.end());
  step.v.assign(v.begin(), v.end());
  for (size_t i = 0; i < k.size(); ++i) {
    TORCH_CHECK(k[i].scalar_type() == at::kFloat && k[i].is_contiguous() && k[i].dim() == 4 &&
                    v[i].sizes() == k[i].sizes() && v[i].is_contiguous() && v[i].scalar_type() == at::kFloat &&
                    k[i].sizes() == k[0].sizes(),
                who, ": layer ", i, " cache must be contiguous float32 [B, KV, capacity, D]");
  }
}

// Per query n: its committed span [lo, hi) (lo > hi: none), then its ancestors anc[off[n] .. off[n + 1]], all as
// *logical* slots, mapped to cache slots by `map` (the identity for a row cache, the block table when paged).
template <typename Map>
void fill_spans(Spans& s, int64_t N, const at::Tensor& span, const at::Tensor& anc_off, const at::Tensor& anc,
                const char* who, Map map) {
  std::vector<int64_t> lohi = to_vector(span), off = to_vector(anc_off), an = to_vector(anc);
  TORCH_CHECK(static_cast<int64_t>(lohi.size()) == 2 * N && static_cast<int64_t>(off.size()) == N + 1 &&
                  off[0] == 0 && off[N] == static_cast<int64_t>(an.size()),
              who, ": spans do not match ", N, " queries");
  s.keys.assign(N, {});
  s.lo.resize(N);
  s.run.resize(N);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t lo = lohi[2 * n], hi = std::max(lohi[2 * n], lohi[2 * n + 1]);   // lo > hi: the window cut all
    TORCH_CHECK(lo >= 0 && off[n + 1] >= off[n], who, ": bad span or ancestor offsets at query ", n);
    s.lo[n] = lo;
    s.run[n] = hi - lo;
    std::vector<int64_t>& keys = s.keys[n];
    keys.reserve(hi - lo + off[n + 1] - off[n]);
    for (int64_t j = lo; j < hi; ++j) keys.push_back(map(n, j));
    for (int64_t a = off[n]; a < off[n + 1]; ++a) keys.push_back(map(n, an[a]));
  }
}

void bind_step(at::TensorList k, at::TensorList v, const at::Tensor& slots, int64_t T,
               const at::Tensor& span_full, const at::Tensor& anc_off_full, const at::Tensor& anc_full,
               const at::Tensor& span_sliding, const at::Tensor& anc_off_sliding, const at::Tensor& anc_sliding) {
  bind_caches(k, v, "bind_step");
  step.slots = to_vector(slots);
  const int64_t N = static_cast<int64_t>(step.slots.size());
  const int64_t capacity = k[0].size(2), B = k[0].size(0);
  TORCH_CHECK(T >= 1 && N % T == 0 && N / T <= B, "bind_step: ", N, " tokens are not rows of ", T, " in a batch of ", B);
  step.row.resize(N);
  for (int64_t n = 0; n < N; ++n) step.row[n] = n / T;
  step.group = step.row;
  auto identity = [&](int64_t, int64_t j) {
    TORCH_CHECK(j >= 0 && j < capacity, "bind_step: slot ", j, " beyond the cache");
    return j;
  };
  fill_spans(step.spans[0], N, span_full, anc_off_full, anc_full, "bind_step", identity);
  fill_spans(step.spans[1], N, span_sliding, anc_off_sliding, anc_sliding, "bind_step", identity);
  for (int64_t slot : step.slots) TORCH_CHECK(slot >= 0 && slot < capacity, "bind_step: slot beyond the cache");
  step.bound = true;
}

// A paged step: the caches are one pool [1, KV, S, D] of blocks of `block_size` slots; sequence s owns the blocks
// tables[table_off[s] .. table_off[s + 1]] (its logical slot j lives in pool slot table[j / block_size] *
// block_size + j % block_size). Query n belongs to sequence seq[n]; its spans and ancestors are logical slots of
// that sequence; slots [N] are the pool slots its key/value is written to.
void bind_paged(at::TensorList k, at::TensorList v, const at::Tensor& slots, int64_t block_size,
                const at::Tensor& tables, const at::Tensor& table_off, const at::Tensor& seq,
                const at::Tensor& span_full, const at::Tensor& anc_off_full, const at::Tensor& anc_full,
                const at::Tensor& span_sliding, const at::Tensor& anc_off_sliding, const at::Tensor& anc_sliding) {
  bind_caches(k, v, "bind_paged");
  TORCH_CHECK(k[0].size(0) == 1, "bind_paged: the pool is one row [1, KV, S, D]");
  TORCH_CHECK(block_size >= 1, "bind_paged: block_size must be >= 1");
  step.slots = to_vector(slots);
  const int64_t N = static_cast<int64_t>(step.slots.size()), pool = k[0].size(2);
  const std::vector<int64_t> table = to_vector(tables), toff = to_vector(table_off);
  step.group = to_vector(seq);
  TORCH_CHECK(static_cast<int64_t>(step.group.size()) == N, "bind_paged: seq must have one entry per query");
  const int64_t S = static_cast<int64_t>(toff.size()) - 1;
  TORCH_CHECK(S >= 0 && (S == 0 || toff[S] == static_cast<int64_t>(table.size())), "bind_paged: bad table offsets");
  for (int64_t b : table) TORCH_CHECK(b >= 0 && (b + 1) * block_size <= pool, "bind_paged: block ", b, " beyond the pool");
  step.row.assign(N, 0);
  auto paged = [&](int64_t n, int64_t j) {
    const int64_t s = step.group[n];
    TORCH_CHECK(s >= 0 && s < S, "bind_paged: query ", n, " names sequence ", s, " of ", S);
    const int64_t blk = j / block_size;
    TORCH_CHECK(j >= 0 && blk < toff[s + 1] - toff[s], "bind_paged: logical slot ", j, " of sequence ", s,
                " beyond its ", toff[s + 1] - toff[s], " blocks");
    return table[toff[s] + blk] * block_size + j % block_size;
  };
  fill_spans(step.spans[0], N, span_full, anc_off_full, anc_full, "bind_paged", paged);
  fill_spans(step.spans[1], N, span_sliding, anc_off_sliding, anc_sliding, "bind_paged", paged);
  for (int64_t slot : step.slots) TORCH_CHECK(slot >= 0 && slot < pool, "bind_paged: slot beyond the pool");
  step.bound = true;
}

void unbind_step() {
  step.k.clear();
  step.v.clear();
  step.bound = false;
}

// Lane-split dot product: 16 independent partial sums, combined as a fixed tree. The compiler
// vectorizes the lanes; the order of additions is fixed by the code, not by the data.
inline float dot(const float* a, const float* b, int64_t D) {
  float acc[16] = {0};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[d + l] * b[d + l];
  float tail = 0.f;
  for (; d < D; ++d) tail += a[d] * b[d];
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0] + tail;
}

// exp(x) for x <= 0 (Cephes' expf polynomial, ~1 ulp): branch-free so loops over it vectorize.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float r2 = r * r;
  float y = 1.9875691500E-4f;
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * r2 + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// One (query, head) over its keys: the portable loop (CPUs without AVX-512).
void attend_one(const float* q, const float* K, const float* V, float* out, int64_t D, const int64_t* keys,
                int64_t L, float scale, std::vector<float>& scratch) {
  scratch.resize(static_cast<size_t>(L));
  float* p = scratch.data();
  float m = -INFINITY;
  for (int64_t j = 0; j < L; ++j) {
    p[j] = dot(q, K + keys[j] * D, D) * scale;
    m = std::max(m, p[j]);
  }
  float sum = 0.f;
  for (int64_t j = 0; j < L; ++j) p[j] = exp_nonpositive(p[j] - m);
  for (int64_t j = 0; j < L; ++j) sum += p[j];
  std::fill(out, out + D, 0.f);
  for (int64_t j = 0; j < L; ++j) {
    const float* vj = V + keys[j] * D;
    const float pj = p[j];
    for (int64_t d = 0; d < D; ++d) out[d] += pj * vj[d];
  }
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

#if defined(__AVX512F__)
// exp_nonpositive on 16 lanes: the same polynomial, fused multiply-adds.
inline __m512 exp512_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(fx, _mm512_set1_ps(2.12194440e-4f), r);
  const __m512 r2 = _mm512_mul_ps(r, r);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, r2, r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}

// Sums of 16 vectors at once: lane k of the result is the sum of a[k]'s 16 lanes, always by the same tree
// ((x0 + x2) + (x1 + x3) within each 128-bit quarter, then quarters (0 + 2) + (1 + 3)), wherever k is.
inline __m512 reduce16(const __m512* a) {
  __m512 c[8], e[4];
  for (int m = 0; m < 8; ++m)
    c[m] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * m], a[2 * m + 1]), _mm512_unpackhi_ps(a[2 * m], a[2 * m + 1]));
  for (int n = 0; n < 4; ++n)
    e[n] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * n], c[2 * n + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(c[2 * n], c[2 * n + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 g0 = _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(e[0], e[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 g1 = _mm512_add_ps(_mm512_shuffle_f32x4(e[2], e[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(e[2], e[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(g0, g1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(g0, g1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Scores of one query head for one block of n <= 16 keys: p[k] = scale * q . K[keys[k]], each a lane-wise
// chain over the D / 16 chunks in order (four keys in flight), then reduce16; mx = max(mx, p). Blocks
// start every 16 entries of the query's own key list, so a key's arithmetic depends only on that list.
inline void score_block(const float* q, const float* K, const int64_t* keys, int64_t n, int64_t D, __m512 sv,
                        float* p, __m512& mx) {
  const int64_t C = D / 16;
  __m512 t[16];
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {   // four keys in flight: independent chains hide the FMA latency
    const float* k0 = K + keys[k] * D;
    const float* k1 = K + keys[k + 1] * D;
    const float* k2 = K + keys[k + 2] * D;
    const float* k3 = K + keys[k + 3] * D;
    __m512 qc = _mm512_loadu_ps(q);
    __m512 a0 = _mm512_mul_ps(qc, _mm512_loadu_ps(k0)), a1 = _mm512_mul_ps(qc, _mm512_loadu_ps(k1));
    __m512 a2 = _mm512_mul_ps(qc, _mm512_loadu_ps(k2)), a3 = _mm512_mul_ps(qc, _mm512_loadu_ps(k3));
    for (int64_t c = 1; c < C; ++c) {
      qc = _mm512_loadu_ps(q + 16 * c);
      a0 = _mm512_fmadd_ps(qc, _mm512_loadu_ps(k0 + 16 * c), a0);
      a1 = _mm512_fmadd_ps(qc, _mm512_loadu_ps(k1 + 16 * c), a1);
      a2 = _mm512_fmadd_ps(qc, _mm512_loadu_ps(k2 + 16 * c), a2);
      a3 = _mm512_fmadd_ps(qc, _mm512_loadu_ps(k3 + 16 * c), a3);
    }
    t[k] = a0, t[k + 1] = a1, t[k + 2] = a2, t[k + 3] = a3;
  }
  for (; k < n; ++k) {   // the same chain, one key at a time
    const float* kj = K + keys[k] * D;
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(kj));
    for (int64_t c = 1; c < C; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), _mm512_loadu_ps(kj + 16 * c), acc);
    t[k] = acc;
  }
  for (; k < 16; ++k) t[k] = _mm512_setzero_ps();
  const __mmask16 valid = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
  const __m512 sc = _mm512_mul_ps(reduce16(t), sv);
  _mm512_mask_storeu_ps(p, valid, sc);
  mx = _mm512_mask_max_ps(mx, valid, mx, sc);
}

// score_block for two query heads over the same full block of 16 keys, interleaved so eight chains are
// in flight instead of four (two FMA ports x four cycles of latency). Each query's arithmetic is
// score_block's exactly: the same products, chains and reduce16.
inline void score_block2(const float* qa, const float* qb, const float* K, const int64_t* keys, int64_t D,
                         __m512 sv, float* pa, float* pb, __m512& mxa, __m512& mxb) {
  const int64_t C = D / 16;
  __m512 ta[16], tb[16];
  for (int64_t k = 0; k < 16; k += 4) {
    const float* k0 = K + keys[k] * D;
    const float* k1 = K + keys[k + 1] * D;
    const float* k2 = K + keys[k + 2] * D;
    const float* k3 = K + keys[k + 3] * D;
    __m512 x0 = _mm512_loadu_ps(k0), x1 = _mm512_loadu_ps(k1), x2 = _mm512_loadu_ps(k2), x3 = _mm512_loadu_ps(k3);
    __m512 qc = _mm512_loadu_ps(qa), rc = _mm512_loadu_ps(qb);
    __m512 a0 = _mm512_mul_ps(qc, x0), a1 = _mm512_mul_ps(qc, x1), a2 = _mm512_mul_ps(qc, x2), a3 = _mm512_mul_ps(qc, x3);
    __m512 b0 = _mm512_mul_ps(rc, x0), b1 = _mm512_mul_ps(rc, x1), b2 = _mm512_mul_ps(rc, x2), b3 = _mm512_mul_ps(rc, x3);
    for (int64_t c = 1; c < C; ++c) {
      qc = _mm512_loadu_ps(qa + 16 * c), rc = _mm512_loadu_ps(qb + 16 * c);
      x0 = _mm512_loadu_ps(k0 + 16 * c), x1 = _mm512_loadu_ps(k1 + 16 * c);
      x2 = _mm512_loadu_ps(k2 + 16 * c), x3 = _mm512_loadu_ps(k3 + 16 * c);
      a0 = _mm512_fmadd_ps(qc, x0, a0), a1 = _mm512_fmadd_ps(qc, x1, a1);
      a2 = _mm512_fmadd_ps(qc, x2, a2), a3 = _mm512_fmadd_ps(qc, x3, a3);
      b0 = _mm512_fmadd_ps(rc, x0, b0), b1 = _mm512_fmadd_ps(rc, x1, b1);
      b2 = _mm512_fmadd_ps(rc, x2, b2), b3 = _mm512_fmadd_ps(rc, x3, b3);
    }
    ta[k] = a0, ta[k + 1] = a1, ta[k + 2] = a2, ta[k + 3] = a3;
    tb[k] = b0, tb[k + 1] = b1, tb[k + 2] = b2, tb[k + 3] = b3;
  }
  const __m512 sa = _mm512_mul_ps(reduce16(ta), sv), sb = _mm512_mul_ps(reduce16(tb), sv);
  _mm512_storeu_ps(pa, sa);
  _mm512_storeu_ps(pb, sb);
  mxa = _mm512_max_ps(mxa, sa);
  mxb = _mm512_max_ps(mxb, sb);
}

// values_range for two pairs over the same keys (each pair's chains exactly values_range's), interleaved
// so twice the chains are in flight.
template <int C>
void values_range2(float* acc_a, const float* p_a, float* acc_b, const float* p_b, const int64_t* keys, int64_t j0,
                   int64_t j1, const float* V, int64_t D) {
  __m512 a[C], b[C];
  for (int c = 0; c < C; ++c) a[c] = _mm512_loadu_ps(acc_a + 16 * c), b[c] = _mm512_loadu_ps(acc_b + 16 * c);
  for (int64_t j = j0; j < j1; ++j) {
    const float* vj = V + keys[j] * D;
    const __m512 wa = _mm512_set1_ps(p_a[j]), wb = _mm512_set1_ps(p_b[j]);
    for (int c = 0; c < C; ++c) {
      const __m512 v = _mm512_loadu_ps(vj + 16 * c);
      a[c] = _mm512_fmadd_ps(wa, v, a[c]);
      b[c] = _mm512_fmadd_ps(wb, v, b[c]);
    }
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc_a + 16 * c, a[c]), _mm512_storeu_ps(acc_b + 16 * c, b[c]);
}

// acc[0 .. D) += sum_{j in [j0, j1)} p[j] V[keys[j]], one chain per lane over j in order (acc in memory
// between calls: storing and reloading a float changes nothing, so any split of the range gives the same sums).
template <int C>
void values_range(float* acc, const float* p, const int64_t* keys, int64_t j0, int64_t j1, const float* V, int64_t D) {
  __m512 a[C];
  for (int c = 0; c < C; ++c) a[c] = _mm512_loadu_ps(acc + 16 * c);
  for (int64_t j = j0; j < j1; ++j) {
    const float* vj = V + keys[j] * D;
    const __m512 b = _mm512_set1_ps(p[j]);
    for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(b, _mm512_loadu_ps(vj + 16 * c), a[c]);
  }
  for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + 16 * c, a[c]);
}

void values_range_any(float* acc, const float* p, const int64_t* keys, int64_t j0, int64_t j1, const float* V,
                      int64_t D) {
  for (int64_t c = 0; c < D / 16; ++c) {
    __m512 a = _mm512_loadu_ps(acc + 16 * c);
    for (int64_t j = j0; j < j1; ++j) a = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_loadu_ps(V + keys[j] * D + 16 * c), a);
    _mm512_storeu_ps(acc + 16 * c, a);
  }
}

using ValuesFn = void (*)(float*, const float*, const int64_t*, int64_t, int64_t, const float*, int64_t);
using Values2Fn = void (*)(float*, const float*, float*, const float*, const int64_t*, int64_t, int64_t, const float*,
                           int64_t);

struct ValuesFns {   // the value loops for one head size: one pair, and two pairs (nullptr: pairs go one by one)
  ValuesFn one;
  Values2Fn two;
};

template <int C>
constexpr ValuesFns values_for() { return {values_range<C>, values_range2<C>}; }

ValuesFns values_fns(int64_t D) {
  switch (D / 16) {
    case 1: return values_for<1>();
    case 2: return values_for<2>();
    case 4: return values_for<4>();
    case 8: return values_for<8>();
    case 16: return values_for<16>();
    default: return {values_range_any, nullptr};
  }
}

struct PairRef {          // one (query, head): its query vector, output, key slots (committed range, ancestors)
  const float* q;
  float* out;
  const int64_t* keys;
  int64_t L;
};

// Up to 8 (query, head) pairs of one kv head whose key lists all start with the same Ls (a multiple of
// 16) consecutive committed slots: those keys are read once per block for all pairs (from L1) instead
// of once per pair; every pair's arithmetic is exactly what it is alone (same blocks, same chains).
void attend_pairs512(const PairRef* pr, int64_t P, int64_t Ls, const float* K, const float* V, int64_t D,
                     float scale, std::vector<float>& scratch) {
  int64_t Lmax = 0;
  for (int64_t i = 0; i < P; ++i) Lmax = std::max(Lmax, pr[i].L);
  const int64_t Lp = (Lmax + 15) / 16 * 16, stride = Lp + D;
  scratch.assign(static_cast<size_t>(P * stride), 0.f);
  const __m512 sv = _mm512_set1_ps(scale);
  __m512 mx[8];
  for (int64_t i = 0; i < P; ++i) mx[i] = _mm512_set1_ps(-INFINITY);
  const ValuesFns fns = values_fns(D);
  const bool pairwise = fns.two != nullptr;   // shared keys: two pairs at a time, each pair's arithmetic unchanged
  for (int64_t j0 = 0; j0 < Ls; j0 += 16) {
    int64_t i = 0;
    if (pairwise)
      for (; i + 2 <= P; i += 2)
        score_block2(pr[i].q, pr[i + 1].q, K, pr[i].keys + j0, D, sv, scratch.data() + i * stride + j0,
                     scratch.data() + (i + 1) * stride + j0, mx[i], mx[i + 1]);
    for (; i < P; ++i) score_block(pr[i].q, K, pr[i].keys + j0, 16, D, sv, scratch.data() + i * stride + j0, mx[i]);
  }
  for (int64_t i = 0; i < P; ++i)
    for (int64_t j0 = Ls; j0 < pr[i].L; j0 += 16)
      score_block(pr[i].q, K, pr[i].keys + j0, std::min<int64_t>(16, pr[i].L - j0), D, sv,
                  scratch.data() + i * stride + j0, mx[i]);
  float inv[8];
  for (int64_t i = 0; i < P; ++i) {
    float* pi = scratch.data() + i * stride;
    const int64_t L = pr[i].L;
    const __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx[i]));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; j += 16) {
      const __mmask16 valid = static_cast<__mmask16>(L - j >= 16 ? 0xFFFF : (1u << (L - j)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(valid, exp512_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, pi + j), mv)));
      _mm512_mask_storeu_ps(pi + j, valid, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv[i] = 1.f / _mm512_reduce_add_ps(sum);
  }
  const ValuesFn values = fns.one;
  for (int64_t j0 = 0; j0 < Ls; j0 += 32) {
    int64_t i = 0;
    if (pairwise)
      for (; i + 2 <= P; i += 2)
        fns.two(scratch.data() + i * stride + Lp, scratch.data() + i * stride, scratch.data() + (i + 1) * stride + Lp,
                scratch.data() + (i + 1) * stride, pr[i].keys, j0, std::min(j0 + 32, Ls), V, D);
    for (; i < P; ++i)
      values(scratch.data() + i * stride + Lp, scratch.data() + i * stride, pr[i].keys, j0, std::min(j0 + 32, Ls), V, D);
  }
  for (int64_t i = 0; i < P; ++i) {
    float* acc = scratch.data() + i * stride + Lp;
    values(acc, scratch.data() + i * stride, pr[i].keys, Ls, pr[i].L, V, D);
    const __m512 iv = _mm512_set1_ps(inv[i]);
    for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(pr[i].out + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), iv));
  }
}

#endif

at::Tensor attend(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, int64_t layer,
                  int64_t kind, double scale) {
  TORCH_CHECK(step.bound, "leaplm_native::attend called outside a bound step");
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(step.k.size()), "attend: no cache for layer ", layer);
  TORCH_CHECK(kind == 0 || kind == 1, "attend: kind is 0 (full) or 1 (sliding)");
  at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "attend: float32 only");
  const int64_t N = q.size(1), H = q.size(2), D = q.size(3), KV = k.size(2);
  TORCH_CHECK(N == static_cast<int64_t>(step.slots.size()), "attend: ", N, " queries, step bound for ",
              step.slots.size());
  TORCH_CHECK(H % KV == 0, "attend: heads not a multiple of kv heads");
  at::Tensor& kc = step.k[layer];
  at::Tensor& vc = step.v[layer];
  const int64_t capacity = kc.size(2);
  TORCH_CHECK(kc.size(1) == KV && kc.size(3) == D, "attend: cache layout does not match the keys");
  float* Kc = kc.data_ptr<float>();
  float* Vc = vc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {   // write every fed token first: queries see their ancestors
    const int64_t b = step.row[n], slot = step.slots[n];
    for (int64_t h = 0; h < KV; ++h) {
      const int64_t dst = ((b * KV + h) * capacity + slot) * D;
      std::memcpy(Kc + dst, kp + (n * KV + h) * D, D * sizeof(float));
      std::memcpy(Vc + dst, vp + (n * KV + h) * D, D * sizeof(float));
    }
  }
  at::Tensor out = at::empty({1, N, H * D}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Spans& s = step.spans[kind];
  const int64_t group = H / KV;
  const std::vector<std::vector<int64_t>>& keys = s.keys;   // per query: its committed run, then its ancestors
  int64_t keys_total = 0;
  for (int64_t n = 0; n < N; ++n) keys_total += static_cast<int64_t>(keys[n].size());
  const int64_t work = keys_total * H * D;
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    // Units of up to 8 (query, head) pairs of one row and kv head whose queries start at the same
    // committed slot (all nodes of a tree, all tokens of a chain): they share the reads of the first Ls
    // keys. Each pair's result is what it would be alone (attend_pairs512), so neither the grouping nor
    // the threads change any output.
    struct Unit { int64_t b, h, Ls; std::vector<PairRef> pairs; };
    std::vector<Unit> units;
    for (int64_t n0 = 0; n0 < N;) {
      int64_t n1 = n0 + 1;
      while (n1 < N && step.group[n1] == step.group[n0] && s.lo[n1] == s.lo[n0]) ++n1;   // same sequence and start
      int64_t shared = INT64_MAX;
      for (int64_t n = n0; n < n1; ++n) shared = std::min(shared, s.run[n]);
      const int64_t Ls = shared / 16 * 16, b = step.row[n0];
      for (int64_t h = 0; h < KV; ++h) {
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t g = 0; g < group; ++g) {
            if ((n == n0 && g == 0) || units.back().pairs.size() == 8) units.push_back(Unit{b, h, Ls, {}});
            const int64_t head = h * group + g;
            units.back().pairs.push_back(PairRef{qp + (n * H + head) * D, op + (n * H + head) * D, keys[n].data(),
                                                 static_cast<int64_t>(keys[n].size())});
          }
      }
      n0 = n1;
    }
    const int64_t count = static_cast<int64_t>(units.size());
    at::parallel_for(0, count, work < (1 << 16) ? count : 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      for (int64_t u = begin; u < end; ++u) {
        const Unit& unit = units[u];
        const int64_t base = (unit.b * KV + unit.h) * capacity * D;
        attend_pairs512(unit.pairs.data(), static_cast<int64_t>(unit.pairs.size()), unit.Ls, Kc + base, Vc + base, D,
                        static_cast<float>(scale), scratch);
      }
    });
    return out;
  }
#endif
  // portable path: each (query, head) on one thread in a fixed order: threads do not change results
  at::parallel_for(0, N * H, work < (1 << 16) ? N * H : 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / H, head = item % H, h = head / group, b = step.row[n];
      const int64_t base = (b * KV + h) * capacity * D;
      attend_one(qp + (n * H + head) * D, Kc + base, Vc + base, op + (n * H + head) * D, D, keys[n].data(),
                 static_cast<int64_t>(keys[n].size()), static_cast<float>(scale), scratch);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------ top-k
// row_topk(x [N, V] float32, k) -> [N, k] int64: per row the indices of the k largest values, largest first,
// equal values in index order, so k = 1 is torch.argmax (its first maximum). One pass per row: a sorted
// buffer of the k best so far and a vector compare against its k-th value, so almost every 16 values cost
// one compare (logits: a few hundred insertions per 49k-value row). A row holding NaN (which torch ranks
// above every number) is marked and left to the caller (at::topk / at::argmax below).
// Replaces torch.topk + torch.argmax in verification (~35 and ~20 us per 49k-value row on 2 Zen 4 cores,
// ~3 us here; Token Recycling reads the top 8 of every fed token, ~10 rows per pass).

// Returns false (NaN in the row) or writes the k indices.
bool topk_row(const float* x, int64_t V, int64_t k, int64_t* out) {
  float val[64];
  int64_t idx[64];
  int64_t n = 0;
  auto insert = [&](float v, int64_t i) {   // v beats the k-th kept value (or fewer than k kept)
    int64_t j = n < k ? n++ : k - 1;
    while (j > 0 && val[j - 1] < v) {   // after equal values: they have smaller indices
      val[j] = val[j - 1];
      idx[j] = idx[j - 1];
      --j;
    }
    val[j] = v;
    idx[j] = i;
  };
  int64_t i = 0;
  for (; i < k; ++i) {
    if (std::isnan(x[i])) return false;
    insert(x[i], i);
  }
  float thr = val[k - 1];
  // the lanes of x[base ..] flagged in `mask` (above the threshold, or NaN) in index order; false at a NaN
  auto take = [&](int64_t base, uint32_t mask) {
    while (mask) {
      const int64_t j = base + __builtin_ctz(mask);
      mask &= mask - 1;
      if (std::isnan(x[j])) return false;
      if (x[j] > thr) {
        insert(x[j], j);
        thr = val[k - 1];
      }
    }
    return true;
  };
#if defined(__AVX512F__)
  for (; i + 16 <= V; i += 16)   // not (x <= thr): x > thr or NaN
    if (!take(i, _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), _mm512_set1_ps(thr), _CMP_NLE_UQ))) return false;
#elif defined(__AVX2__)
  for (; i + 8 <= V; i += 8)
    if (!take(i, static_cast<uint32_t>(_mm256_movemask_ps(
                     _mm256_cmp_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(thr), _CMP_NLE_UQ)))))
      return false;
#endif
  for (; i < V; ++i)
    if (!take(i, 1u)) return false;
  std::copy(idx, idx + k, out);
  return true;
}

at::Tensor row_topk(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "row_topk: x must be a float32 [N, V] tensor");
  TORCH_CHECK(k >= 1 && k <= 64 && k <= x.size(1), "row_topk: k must be in 1..min(64, V), got ", k);
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t N = xc.size(0), V = xc.size(1), ld = xc.stride(0);
  at::Tensor out = at::empty({N, k}, x.options().dtype(at::kLong));
  const float* xp = xc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  std::vector<char> nan_rows(N, 0);
  at::parallel_for(0, N, N * V < (1 << 17) ? N : 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) nan_rows[r] = !topk_row(xp + r * ld, V, k, op + r * k);
  });
  for (int64_t r = 0; r < N; ++r)
    if (nan_rows[r])
      out[r].copy_(k == 1 ? xc[r].argmax().reshape({1}) : std::get<1>(xc[r].topk(k)));
  return out;
}

}  // namespace

TORCH_LIBRARY(leaplm_native, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scale, Tensor minv, int out_features) -> Tensor");
  m.impl("int4_linear", c10::DispatchKey::CPU, TORCH_FN(int4_linear));
  m.def("int8_vnni() -> bool", &int8_vnni);
  m.def("int8_amx() -> bool", &int8_amx);
  m.def("int8_amx_min_rows(int rows) -> int", &int8_amx_min_rows);
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor wscale, Tensor comp, int out_features) -> Tensor");
  m.impl("int8_linear", c10::DispatchKey::CPU, TORCH_FN(int8_linear));
  m.def("bind_step(Tensor[] k, Tensor[] v, Tensor slots, int T, Tensor span_full, Tensor anc_off_full, "
        "Tensor anc_full, Tensor span_sliding, Tensor anc_off_sliding, Tensor anc_sliding) -> ()",
        &bind_step);
  m.def("bind_paged(Tensor[] k, Tensor[] v, Tensor slots, int block_size, Tensor tables, Tensor table_off, "
        "Tensor seq, Tensor span_full, Tensor anc_off_full, Tensor anc_full, Tensor span_sliding, "
        "Tensor anc_off_sliding, Tensor anc_sliding) -> ()",
        &bind_paged);
  m.def("unbind_step() -> ()", &unbind_step);
  m.def("attend(Tensor q, Tensor k, Tensor v, int layer, int kind, float scale) -> Tensor");
  m.impl("attend", c10::DispatchKey::CPU, TORCH_FN(attend));
  m.def("row_topk(Tensor x, int k) -> Tensor");
  m.impl("row_topk", c10::DispatchKey::CPU, TORCH_FN(row_topk));
}
