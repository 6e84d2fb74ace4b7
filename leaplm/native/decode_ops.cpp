// Native CPU operators of the compiled decode step (leaplm/models/compiled.py), built at first use by
// leaplm/native/__init__.py. The first two do what the Python custom ops did with ~40-200 us of
// interpreter work per call, ~150 calls per step; the third is leaplm's int4 GEMM (quant/int4.py):
//
// - leaplm_native::int8_linear(x [M, in + 2], handle, out) -> [M, out]: fbgemm's dynamic int8 GEMM on a
//   packed weight registered with int8_bind (the packed weight is a TorchScript object, which the graph
//   cannot hold, so it passes an integer handle).
// - leaplm_native::attend(q [1, N, H, D], k, v [1, N, KV, D], layer, kind) -> [1, N, H * D]: writes the
//   step's keys/values into the KV cache bound by bind_step and attends. Every query is computed on its
//   own over exactly the slots it sees (a range of committed slots, then its tree ancestors in depth
//   order), by the same loop whatever N is, so a row's result does not depend on the other rows or on
//   how many draft tokens share the pass: speculation reproduces single-token decoding bit for bit.
// - leaplm_native::int4_linear(x [M, K], qweight, scale, minv, out) -> [M, out]: 4-bit weights in groups of
//   32, activations quantized to int8 per row and group (layout and arithmetic: the int4 section below).
//
// The step geometry (cache tensors, slot of each fed token, per-query spans) is bound once per step by
// bind_step, per thread (as Python's `compiled.active`).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/quantized/PackedParams.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

// ------------------------------------------------------------------------------------------ int8 GEMM
std::mutex weights_mutex;
std::vector<c10::intrusive_ptr<LinearPackedParamsBase>> weights;   // handle -> packed weight

int64_t int8_bind(const c10::intrusive_ptr<LinearPackedParamsBase>& packed) {
  std::lock_guard<std::mutex> lock(weights_mutex);
  weights.push_back(packed);
  return static_cast<int64_t>(weights.size()) - 1;
}

void int8_release(int64_t handle) {
  std::lock_guard<std::mutex> lock(weights_mutex);
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(weights.size()), "bad int8 weight handle ", handle);
  weights[handle].reset();
}

at::Tensor int8_linear(const at::Tensor& x, int64_t handle, int64_t out_features) {
  c10::intrusive_ptr<LinearPackedParamsBase> packed;
  {
    std::lock_guard<std::mutex> lock(weights_mutex);
    TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(weights.size()) && weights[handle],
                "int8 weight handle ", handle, " is not bound");
    packed = weights[handle];
  }
  at::Tensor y = packed->apply_dynamic(x.contiguous(), /*reduce_range=*/false);
  TORCH_CHECK(y.size(-1) == out_features, "int8 weight ", handle, " has ", y.size(-1), " outputs, not ",
              out_features);
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
struct Spans {            // per query n: slots [lo[n], hi[n]) then anc[off[n] .. off[n + 1])
  std::vector<int64_t> lo, hi, off, anc;
};

struct Step {
  std::vector<at::Tensor> k, v;   // per layer [B, KV, capacity, D] float32, contiguous
  std::vector<int64_t> slots;     // [N]: the cache slot of each fed token
  int64_t T = 0;                  // fed tokens per row (row of token n: n / T)
  Spans spans[2];                 // 0: full-attention layers, 1: sliding-window layers
  bool bound = false;
};

thread_local Step step;

std::vector<int64_t> to_vector(const at::Tensor& t) {
  at::Tensor c = t.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

void bind_step(at::TensorList k, at::TensorList v, const at::Tensor& slots, int64_t T,
               const at::Tensor& span_full, const at::Tensor& anc_off_full, const at::Tensor& anc_full,
               const at::Tensor& span_sliding, const at::Tensor& anc_off_sliding, const at::Tensor& anc_sliding) {
  TORCH_CHECK(k.size() == v.size() && !k.empty(), "bind_step: one key and one value tensor per layer");
  step.k.assign(k.begin(), k.end());
  step.v.assign(v.begin(), v.end());
  for (size_t i = 0; i < k.size(); ++i) {
    TORCH_CHECK(k[i].scalar_type() == at::kFloat && k[i].is_contiguous() && k[i].dim() == 4 &&
                    v[i].sizes() == k[i].sizes() && v[i].is_contiguous() && v[i].scalar_type() == at::kFloat,
                "bind_step: layer ", i, " cache must be contiguous float32 [B, KV, capacity, D]");
  }
  step.slots = to_vector(slots);
  step.T = T;
  const at::Tensor* spans[2][3] = {{&span_full, &anc_off_full, &anc_full},
                                   {&span_sliding, &anc_off_sliding, &anc_sliding}};
  const int64_t N = static_cast<int64_t>(step.slots.size());
  const int64_t capacity = k[0].size(2);
  for (int kind = 0; kind < 2; ++kind) {
    Spans& s = step.spans[kind];
    std::vector<int64_t> lohi = to_vector(*spans[kind][0]);
    s.off = to_vector(*spans[kind][1]);
    s.anc = to_vector(*spans[kind][2]);
    TORCH_CHECK(static_cast<int64_t>(lohi.size()) == 2 * N && static_cast<int64_t>(s.off.size()) == N + 1 &&
                    s.off[N] == static_cast<int64_t>(s.anc.size()),
                "bind_step: spans do not match ", N, " queries");
    s.lo.resize(N);
    s.hi.resize(N);
    for (int64_t n = 0; n < N; ++n) {
      s.lo[n] = lohi[2 * n];
      s.hi[n] = std::max(lohi[2 * n], lohi[2 * n + 1]);   // lo > hi: no committed slot in the window
      TORCH_CHECK(s.lo[n] >= 0 && s.hi[n] <= capacity, "bind_step: span beyond the cache");
    }
    for (int64_t a : s.anc) TORCH_CHECK(a >= 0 && a < capacity, "bind_step: ancestor slot beyond the cache");
  }
  for (int64_t slot : step.slots) TORCH_CHECK(slot >= 0 && slot < capacity, "bind_step: slot beyond the cache");
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

// One (query token, kv head): the `group` heads sharing kv head h attend over the query's keys.
void attend_one(const float* q, const float* K, const float* V, float* out, int64_t group, int64_t D,
                int64_t head_stride_q, const int64_t* keys, int64_t L, float scale, std::vector<float>& scratch) {
  scratch.resize(static_cast<size_t>(L));
  float* p = scratch.data();
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * head_stride_q;
    float m = -INFINITY;
    for (int64_t j = 0; j < L; ++j) {
      p[j] = dot(qg, K + keys[j] * D, D) * scale;
      m = std::max(m, p[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < L; ++j) p[j] = exp_nonpositive(p[j] - m);
    for (int64_t j = 0; j < L; ++j) sum += p[j];
    float* o = out + g * head_stride_q;
    std::fill(o, o + D, 0.f);
    for (int64_t j = 0; j < L; ++j) {
      const float* vj = V + keys[j] * D;
      const float pj = p[j];
      for (int64_t d = 0; d < D; ++d) o[d] += pj * vj[d];
    }
    const float inv = 1.f / sum;
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
  }
}

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
  const int64_t T = step.T;
  for (int64_t n = 0; n < N; ++n) {   // write every fed token first: queries see their ancestors
    const int64_t b = n / T, slot = step.slots[n];
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
  int64_t keys_total = 0;
  for (int64_t n = 0; n < N; ++n) keys_total += (s.hi[n] - s.lo[n]) + (s.off[n + 1] - s.off[n]);
  // each (query, kv head) runs on one thread in a fixed order: threads do not change results
  const int64_t work = keys_total * H * D;
  const int64_t grain = work < (1 << 21) ? N * KV : 1;
  at::parallel_for(0, N * KV, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> keys;
    std::vector<float> scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / KV, h = item % KV, b = n / T;
      keys.clear();
      for (int64_t j = s.lo[n]; j < s.hi[n]; ++j) keys.push_back(j);
      for (int64_t a = s.off[n]; a < s.off[n + 1]; ++a) keys.push_back(s.anc[a]);
      const int64_t base = (b * KV + h) * capacity * D;
      attend_one(qp + (n * H + h * group) * D, Kc + base, Vc + base, op + (n * H + h * group) * D, group, D, D,
                 keys.data(), static_cast<int64_t>(keys.size()), static_cast<float>(scale), scratch);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(leaplm_native, m) {
  m.def("int8_bind(__torch__.torch.classes.quantized.LinearPackedParamsBase packed) -> int", &int8_bind);
  m.def("int8_release(int handle) -> ()", &int8_release);
  m.def("int8_linear(Tensor x, int handle, int out_features) -> Tensor");
  m.impl("int8_linear", c10::DispatchKey::CPU, TORCH_FN(int8_linear));
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scale, Tensor minv, int out_features) -> Tensor");
  m.impl("int4_linear", c10::DispatchKey::CPU, TORCH_FN(int4_linear));
  m.def("bind_step(Tensor[] k, Tensor[] v, Tensor slots, int T, Tensor span_full, Tensor anc_off_full, "
        "Tensor anc_full, Tensor span_sliding, Tensor anc_off_sliding, Tensor anc_sliding) -> ()",
        &bind_step);
  m.def("unbind_step() -> ()", &unbind_step);
  m.def("attend(Tensor q, Tensor k, Tensor v, int layer, int kind, float scale) -> Tensor");
  m.impl("attend", c10::DispatchKey::CPU, TORCH_FN(attend));
}
