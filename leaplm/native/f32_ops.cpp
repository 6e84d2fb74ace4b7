// A batch-invariant float32 linear layer (leaplm/quant/float32.py), built with the other native ops by
// leaplm/native/__init__.py.
//
// - leaplm_native::f32_linear(x [M, K], wpacked [N_p / 16, K, 16], bias [N] or None, N) -> [M, N] float32:
//   y[m][o] = acc + bias[o], acc = one chain over k = 0 .. K-1 in order: acc_0 = 0, acc_{k+1} = fma(x[m][k],
//   w[o][k], acc_k) (a fused multiply-add, rounded once per step). The weight is packed once (at load) in blocks
//   of 16 outputs, N zero-padded to N_p: wpacked[b][k][i] = w[16 b + i][k], so one 512-bit load holds input k of
//   16 outputs and one FMA with x[m][k] broadcast advances 16 outputs.
// - leaplm_native::f32_portable(on) -> bool: run the portable loop instead of the AVX-512 one (for tests);
//   returns the previous setting.
//
// Batch invariance: every output element is that one chain, whatever M is, wherever the row sits in the batch,
// however rows and outputs are tiled and whichever thread computes it (no K splitting, no M-dependent
// arithmetic; tiles differ only in how many chains run side by side). torch's F.linear is not: its gemv (1 row)
// and gemm kernels (and the gemm's blocking by M) sum in other orders, so a row's last bits change with the batch.
//
// The portable loop (no AVX-512, or f32_portable(true)) runs the same chains with std::fma, one output at a time
// per lane; with a hardware FMA (compiled in by -march=native) it gives the AVX-512 loop's bits exactly, else a
// software fma: slow, still the same correctly rounded steps.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>

namespace {

constexpr int64_t kBlock = 16;     // outputs per packed block (one zmm)
constexpr int64_t kPanel = 4;      // blocks per register tile (64 outputs)
constexpr int64_t kRows = 6;       // rows per register tile: 6 x 4 = 24 accumulators of 32 zmm registers
constexpr int64_t kRowGroup = 48;  // rows one work item covers (its x rows stay in L1/L2 across the panels)

std::atomic<bool> portable{false};

bool f32_portable(bool on) { return portable.exchange(on); }

// R rows (x rows `ldx` floats apart) x NB blocks (the next block `bstride` floats on) over all K inputs, into y
// (rows `ldy` apart, columns from the first block's first output; `valid` of the NB * 16 columns are stored).
// `bias`: the tile's first output's bias, or null.
template <int R, int NB>
void f32_tile(const float* x, int64_t ldx, const float* w, int64_t bstride, int64_t K, const float* bias,
              float* y, int64_t ldy, int64_t valid) {
#if defined(__AVX512F__)
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int nb = 0; nb < NB; ++nb) acc[r][nb] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[NB];
    for (int nb = 0; nb < NB; ++nb) wv[nb] = _mm512_loadu_ps(w + nb * bstride + k * kBlock);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
      for (int nb = 0; nb < NB; ++nb) acc[r][nb] = _mm512_fmadd_ps(xb, wv[nb], acc[r][nb]);
    }
  }
  for (int nb = 0; nb < NB; ++nb) {
    const int64_t left = valid - nb * kBlock;
    const __mmask16 mask = static_cast<__mmask16>(left >= kBlock ? 0xFFFF : (1u << left) - 1);
    const __m512 bv = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + nb * kBlock) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      const __m512 out = bias != nullptr ? _mm512_add_ps(acc[r][nb], bv) : acc[r][nb];
      _mm512_mask_storeu_ps(y + r * ldy + nb * kBlock, mask, out);
    }
  }
#else
  (void)x, (void)ldx, (void)w, (void)bstride, (void)K, (void)bias, (void)y, (void)ldy, (void)valid;
#endif
}

// The portable loop: n rows x nb blocks, each element the same chain of std::fma steps.
void f32_tile_portable(const float* x, int64_t ldx, const float* w, int64_t bstride, int64_t K,
                       const float* bias, float* y, int64_t ldy, int64_t valid, int64_t n, int64_t nb) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      float acc[kBlock] = {};
      const float* xr = x + r * ldx;
      const float* wb = w + b * bstride;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t i = 0; i < kBlock; ++i) acc[i] = std::fma(xr[k], wb[k * kBlock + i], acc[i]);
      for (int64_t i = 0; i < kBlock && b * kBlock + i < valid; ++i)
        y[r * ldy + b * kBlock + i] = bias != nullptr ? acc[i] + bias[b * kBlock + i] : acc[i];
    }
}

template <int NB>
void f32_rows(const float* x, int64_t ldx, const float* w, int64_t bstride, int64_t K, const float* bias,
              float* y, int64_t ldy, int64_t valid, int64_t n) {
  switch (n) {
    case 1: f32_tile<1, NB>(x, ldx, w, bstride, K, bias, y, ldy, valid); break;
    case 2: f32_tile<2, NB>(x, ldx, w, bstride, K, bias, y, ldy, valid); break;
    case 3: f32_tile<3, NB>(x, ldx, w, bstride, K, bias, y, ldy, valid); break;
    case 4: f32_tile<4, NB>(x, ldx, w, bstride, K, bias, y, ldy, valid); break;
    case 5: f32_tile<5, NB>(x, ldx, w, bstride, K, bias, y, ldy, valid); break;
    default: f32_tile<6, NB>(x, ldx, w, bstride, K, bias, y, ldy, valid); break;
  }
}

at::Tensor f32_linear(const at::Tensor& x_in, const at::Tensor& wpacked, const c10::optional<at::Tensor>& bias,
                      int64_t out_features) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "f32_linear: x must be float32 [M, K], got ",
              x_in.scalar_type(), " ", x_in.sizes());
  TORCH_CHECK(wpacked.dim() == 3 && wpacked.scalar_type() == at::kFloat && wpacked.is_contiguous() &&
                  wpacked.size(2) == kBlock,
              "f32_linear: the weight must be contiguous float32 [N / 16, K, 16] (quant/float32.py pack_weight)");
  const int64_t M = x_in.size(0), K = x_in.size(1), blocks = wpacked.size(0), N = out_features;
  TORCH_CHECK(wpacked.size(1) == K, "f32_linear: x has ", K, " columns; the weight was packed for ",
              wpacked.size(1));
  TORCH_CHECK(N > (blocks - 1) * kBlock && N <= blocks * kBlock, "f32_linear: ", N, " outputs do not fit ", blocks,
              " blocks of 16");
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->numel() == N,
                "f32_linear: bias must be float32 [", N, "], got ", bias->scalar_type(), " ", bias->sizes());
    b = bias->contiguous();
    bp = b.data_ptr<float>();
  }
  at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = wpacked.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if defined(__AVX512F__)
  const bool avx512 = !portable.load();
#else
  const bool avx512 = false;
#endif
  const int64_t bstride = K * kBlock;
  const int64_t panels = (blocks + kPanel - 1) / kPanel, groups = (M + kRowGroup - 1) / kRowGroup;
  // A work item: one panel (up to 64 outputs) for one group of rows; consecutive items share the panel, so a
  // thread streams each weight panel once (from memory: an LM head does not fit the caches) and reuses it from
  // L2 across its rows, while the x rows (far smaller per multiply-add) come from L2/L3 again for every panel.
  // Groups of rows rather than whole panels, so two threads split even a few panels evenly. Enough items per
  // thread chunk that a chunk holds ~2^18 multiply-adds (small calls stay on one thread).
  const int64_t item_work = K * kPanel * kBlock * std::min(M, kRowGroup);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, item_work));
  at::parallel_for(0, panels * groups, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t p = item / groups, g = item % groups;
      const int64_t b0 = p * kPanel, nb = std::min(kPanel, blocks - b0);
      const int64_t col = b0 * kBlock, valid = std::min(nb * kBlock, N - col);
      const float* w = wp + b0 * bstride;
      const float* bias_p = bp != nullptr ? bp + col : nullptr;
      const int64_t m_end = std::min(M, (g + 1) * kRowGroup);
      for (int64_t m0 = g * kRowGroup; m0 < m_end; m0 += kRows) {
        const int64_t n = std::min(kRows, m_end - m0);
        const float* xr = xp + m0 * K;
        float* yr = yp + m0 * N + col;
        if (!avx512) {
          f32_tile_portable(xr, K, w, bstride, K, bias_p, yr, N, valid, n, nb);
          continue;
        }
        switch (nb) {
          case 1: f32_rows<1>(xr, K, w, bstride, K, bias_p, yr, N, valid, n); break;
          case 2: f32_rows<2>(xr, K, w, bstride, K, bias_p, yr, N, valid, n); break;
          case 3: f32_rows<3>(xr, K, w, bstride, K, bias_p, yr, N, valid, n); break;
          default: f32_rows<4>(xr, K, w, bstride, K, bias_p, yr, N, valid, n); break;
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leaplm_native, m) {
  m.def("f32_linear(Tensor x, Tensor wpacked, Tensor? bias, int out_features) -> Tensor");
  m.impl("f32_linear", c10::DispatchKey::CPU, TORCH_FN(f32_linear));
  m.def("f32_portable(bool on) -> bool", &f32_portable);
}
