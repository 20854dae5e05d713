// Fused CPU loops of the k x k OREPA kernel generator (float32, groups = 1).
//
// Why: after the large products (torch.mm), the rest of kernel generation is a dozen
// element-wise passes, small batched products and layout copies over kernel-sized tensors,
// each streaming megabytes through memory. These loops do the same arithmetic in one pass
// per direction, one output channel at a time, with everything of that channel in cache. The
// pure PyTorch path in kxk_kernel.py is the reference (and the path on CUDA, for float64
// bakes, grouped layers, or when this extension is not built); tests check they agree.
//
// Layouts (all contiguous): kernel and its gradient (O, I, X) with X = k * k; pattern
// matrices A = pattern_matrices (nb, O, I), their fixed patterns P (nb, O, X) and scales
// pattern_scales (nb, O); pointwise PW (O, I, E), depthwise DW (I, E, X); composed and g_t
// (O, X, I); the k x k factor of the 1x1 -> kxk branch, C2 = expand_kxk (O, T, X). Names
// follow orepa_mm/cnn/kxk_kernel.py.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

// The per-channel loops are compiled twice, for AVX2/FMA machines and for any x86-64, and
// the loader picks the one the CPU supports (GCC/Clang function multi-versioning).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define OREPA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define OREPA_CLONES
#endif

namespace {

using torch::Tensor;
using OptTensor = c10::optional<Tensor>;
constexpr int64_t kMaxTaps = 64;  // k <= 7

const float* ptr_or_null(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// Inputs must be float32 CPU tensors; they are used contiguous (a no-op for the contiguous
// tensors orepa_mm passes; compiled graphs may hand over other strides).
Tensor dense(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat, name,
              " must be a float32 CPU tensor");
  return t.contiguous();
}

OptTensor dense(const OptTensor& t, const char* name) {
  if (!t.has_value()) return t;
  return dense(*t, name);
}

// Sizes of the branch inputs both directions share: O, I, X = k * k, nb patterns, E.
struct BranchSizes {
  int64_t O, I, X, nb, E;
};

// The inputs both directions share, checked and contiguous.
struct BranchInputs {
  Tensor origin, origin_scale;
  OptTensor pattern_matrices, patterns, pattern_scales, pointwise, depthwise, dws_scale;
};

BranchInputs branch_inputs(const Tensor& origin, const Tensor& origin_scale,
                           const OptTensor& pattern_matrices, const OptTensor& patterns,
                           const OptTensor& pattern_scales,
                           const OptTensor& pointwise, const OptTensor& depthwise,
                           const OptTensor& dws_scale) {
  return {dense(origin, "origin"),
          dense(origin_scale, "origin_scale"),
          dense(pattern_matrices, "pattern_matrices"),
          dense(patterns, "patterns"),
          dense(pattern_scales, "pattern_scales"),
          dense(pointwise, "pointwise"),
          dense(depthwise, "depthwise"),
          dense(dws_scale, "dws_scale")};
}

// Reads the sizes of the shared inputs.
BranchSizes branch_sizes(const Tensor& origin, const OptTensor& pattern_matrices,
                         const OptTensor& pointwise) {
  BranchSizes sizes{origin.size(0), origin.size(1), origin.size(2),
                    pattern_matrices.has_value() ? pattern_matrices->size(0) : 0,
                    pointwise.has_value() ? pointwise->size(2) : 0};
  TORCH_CHECK(sizes.X <= kMaxTaps, "kernel sizes up to 7 x 7 only");
  TORCH_CHECK(sizes.E <= kMaxTaps, "depthwise expansion up to 64 only");
  return sizes;
}

// One output channel of the kernel: dst (I, X). kX / kE > 0 fix X / E at compile time (the
// published 3 x 3 block with E = 8), so that the compiler unrolls and keeps rows in registers.
template <int64_t kX, int64_t kE>
inline __attribute__((always_inline)) void assemble_channel_impl(
    int64_t I, int64_t X_, int64_t nb, int64_t E_, float* __restrict__ dst,
    const float* __restrict__ w0, float v0, const float* __restrict__ a, int64_t a_stride,
    const float* __restrict__ q, const float* __restrict__ pw, const float* __restrict__ dw,
    float vd, const float* __restrict__ comp) {
  const int64_t X = kX > 0 ? kX : X_;
  const int64_t E = kE > 0 ? kE : E_;
  float acc[kMaxTaps];
  for (int64_t i = 0; i < I; ++i) {
    for (int64_t x = 0; x < X; ++x) acc[x] = v0 * w0[i * X + x];
    for (int64_t b = 0; b < nb; ++b) {
      const float m = a[b * a_stride + i];
      for (int64_t x = 0; x < X; ++x) acc[x] += m * q[b * X + x];
    }
    if (pw != nullptr) {
      for (int64_t e = 0; e < E; ++e) {
        const float pe = vd * pw[i * E + e];
        const float* d = dw + (i * E + e) * X;
        for (int64_t x = 0; x < X; ++x) acc[x] += pe * d[x];
      }
    }
    if (comp != nullptr)
      for (int64_t x = 0; x < X; ++x) acc[x] += comp[x * I + i];
    for (int64_t x = 0; x < X; ++x) dst[i * X + x] = acc[x];
  }
}

OREPA_CLONES void assemble_channel(int64_t I, int64_t X, int64_t nb, int64_t E,
                                   float* __restrict__ dst, const float* __restrict__ w0,
                                   float v0, const float* __restrict__ a, int64_t a_stride,
                                   const float* __restrict__ q, const float* __restrict__ pw,
                                   const float* __restrict__ dw, float vd,
                                   const float* __restrict__ comp) {
  if (X == 9 && E == 8)
    assemble_channel_impl<9, 8>(I, X, nb, E, dst, w0, v0, a, a_stride, q, pw, dw, vd, comp);
  else if (X == 9)
    assemble_channel_impl<9, 0>(I, X, nb, E, dst, w0, v0, a, a_stride, q, pw, dw, vd, comp);
  else
    assemble_channel_impl<0, 0>(I, X, nb, E, dst, w0, v0, a, a_stride, q, pw, dw, vd, comp);
}

// out[o,i,:] = v0[o] W0[o,i,:] + sum_b v_b[o] A[b,o,i] P[b,o,:]
//            + v_d[o] sum_e PW[o,i,e] DW[i,e,:] + composed[o,:,i]   (composed is pre-scaled)
Tensor assemble(const Tensor& origin_in, const Tensor& origin_scale_in,
                const OptTensor& pattern_matrices_in, const OptTensor& patterns_in,
                const OptTensor& pattern_scales_in,
                const OptTensor& composed_in, const OptTensor& pointwise_in,
                const OptTensor& depthwise_in, const OptTensor& dws_scale_in) {
  const OptTensor composed = dense(composed_in, "composed");
  const BranchInputs in =
      branch_inputs(origin_in, origin_scale_in, pattern_matrices_in, patterns_in,
                    pattern_scales_in, pointwise_in, depthwise_in, dws_scale_in);
  const Tensor &origin = in.origin, &origin_scale = in.origin_scale;
  const OptTensor &pattern_matrices = in.pattern_matrices, &patterns = in.patterns;
  const OptTensor &pattern_scales = in.pattern_scales;
  const OptTensor &pointwise = in.pointwise, &depthwise = in.depthwise;
  const OptTensor &dws_scale = in.dws_scale;
  const BranchSizes sz = branch_sizes(origin, pattern_matrices, pointwise);
  const int64_t O = sz.O, I = sz.I, X = sz.X, nb = sz.nb, E = sz.E;
  Tensor out = torch::empty_like(origin);
  const float *w0 = origin.data_ptr<float>(), *v0 = origin_scale.data_ptr<float>();
  const float *a = ptr_or_null(pattern_matrices), *pat = ptr_or_null(patterns);
  const float* vs = ptr_or_null(pattern_scales);
  const float* comp = ptr_or_null(composed);
  const float *pw = ptr_or_null(pointwise), *dw = ptr_or_null(depthwise);
  const float* vd = ptr_or_null(dws_scale);
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(std::max<int64_t>(nb * X, 1));
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t x = 0; x < X; ++x) q[b * X + x] = vs[b * O + o] * pat[(b * O + o) * X + x];
      assemble_channel(I, X, nb, E, dst + o * I * X, w0 + o * I * X, v0[o],
                       a == nullptr ? nullptr : a + o * I, O * I, q.data(),
                       pw == nullptr ? nullptr : pw + o * I * E, dw,
                       vd == nullptr ? 0.f : vd[o],
                       comp == nullptr ? nullptr : comp + o * X * I);
    }
  });
  return out;
}

// One output channel of the backward pass over G; partial sums returned through acc_*.
template <int64_t kX, int64_t kE>
inline __attribute__((always_inline)) void branch_backward_channel_impl(
    int64_t I, int64_t X_, int64_t nb, int64_t E_, const float* __restrict__ g,
    const float* __restrict__ w0, float v0, float* __restrict__ d0, float* __restrict__ acc0,
    const float* __restrict__ a, int64_t a_stride, const float* __restrict__ p,
    int64_t p_stride, const float* __restrict__ vs, int64_t vs_stride, float* __restrict__ da,
    float* __restrict__ acc_pattern, const float* __restrict__ pw, const float* __restrict__ dwt,
    float vd, float* __restrict__ dpw, float* __restrict__ acc_dws, float* __restrict__ ddwt,
    float* __restrict__ gt) {
  const int64_t X = kX > 0 ? kX : X_;
  const int64_t E = kE > 0 ? kE : E_;
  float h[kMaxTaps];
  float pe[kMaxTaps];
  for (int64_t i = 0; i < I; ++i) {
    const float* gv = g + i * X;
    float s0 = 0.f;
    for (int64_t x = 0; x < X; ++x) {
      d0[i * X + x] = v0 * gv[x];
      s0 += gv[x] * w0[i * X + x];
    }
    *acc0 += s0;
    for (int64_t b = 0; b < nb; ++b) {
      float s = 0.f;
      for (int64_t x = 0; x < X; ++x) s += gv[x] * p[b * p_stride + x];
      da[b * a_stride + i] = vs[b * vs_stride] * s;
      acc_pattern[b] += a[b * a_stride + i] * s;
    }
    if (pw != nullptr) {
      // Vectorised over e: DW and its gradient are kept taps-first, (I, X, E).
      const float* dwi = dwt + i * X * E;
      float* ddi = ddwt + i * X * E;
      for (int64_t e = 0; e < E; ++e) h[e] = 0.f;
      for (int64_t x = 0; x < X; ++x)
        for (int64_t e = 0; e < E; ++e) h[e] += gv[x] * dwi[x * E + e];
      for (int64_t e = 0; e < E; ++e) {
        dpw[i * E + e] = vd * h[e];
        acc_dws[e] += pw[i * E + e] * h[e];
        pe[e] = vd * pw[i * E + e];
      }
      for (int64_t x = 0; x < X; ++x)
        for (int64_t e = 0; e < E; ++e) ddi[x * E + e] += gv[x] * pe[e];
    }
    if (gt != nullptr)
      for (int64_t x = 0; x < X; ++x) gt[x * I + i] = gv[x];
  }
}

OREPA_CLONES void branch_backward_channel(
    int64_t I, int64_t X, int64_t nb, int64_t E, const float* __restrict__ g,
    const float* __restrict__ w0, float v0, float* __restrict__ d0, float* __restrict__ acc0,
    const float* __restrict__ a, int64_t a_stride, const float* __restrict__ p,
    int64_t p_stride, const float* __restrict__ vs, int64_t vs_stride, float* __restrict__ da,
    float* __restrict__ acc_pattern, const float* __restrict__ pw, const float* __restrict__ dwt,
    float vd, float* __restrict__ dpw, float* __restrict__ acc_dws, float* __restrict__ ddwt,
    float* __restrict__ gt) {
  if (X == 9 && E == 8)
    branch_backward_channel_impl<9, 8>(I, X, nb, E, g, w0, v0, d0, acc0, a, a_stride, p,
                                       p_stride, vs, vs_stride, da, acc_pattern, pw, dwt, vd,
                                       dpw, acc_dws, ddwt, gt);
  else if (X == 9)
    branch_backward_channel_impl<9, 0>(I, X, nb, E, g, w0, v0, d0, acc0, a, a_stride, p,
                                       p_stride, vs, vs_stride, da, acc_pattern, pw, dwt, vd,
                                       dpw, acc_dws, ddwt, gt);
  else
    branch_backward_channel_impl<0, 0>(I, X, nb, E, g, w0, v0, d0, acc0, a, a_stride, p,
                                       p_stride, vs, vs_stride, da, acc_pattern, pw, dwt, vd,
                                       dpw, acc_dws, ddwt, gt);
}

// One pass over the kernel gradient G (O, I, X): the gradients of the origin, pattern and
// depthwise-separable branches, and G with the taps first, g_t (O, X, I), for the composed
// branch's products (an empty tensor when with_transposed is false).
using BranchGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

BranchGrads branch_backward(const Tensor& grad_in, const Tensor& origin_in,
                            const Tensor& origin_scale_in, const OptTensor& pattern_matrices_in,
                            const OptTensor& patterns_in, const OptTensor& pattern_scales_in,
                            const OptTensor& pointwise_in, const OptTensor& depthwise_in,
                            const OptTensor& dws_scale_in, bool with_transposed) {
  const Tensor grad = dense(grad_in, "grad");
  const BranchInputs in =
      branch_inputs(origin_in, origin_scale_in, pattern_matrices_in, patterns_in,
                    pattern_scales_in, pointwise_in, depthwise_in, dws_scale_in);
  const Tensor &origin = in.origin, &origin_scale = in.origin_scale;
  const OptTensor &pattern_matrices = in.pattern_matrices, &patterns = in.patterns;
  const OptTensor &pattern_scales = in.pattern_scales;
  const OptTensor &pointwise = in.pointwise, &depthwise = in.depthwise;
  const OptTensor &dws_scale = in.dws_scale;
  const BranchSizes sz = branch_sizes(origin, pattern_matrices, pointwise);
  const int64_t O = sz.O, I = sz.I, X = sz.X, nb = sz.nb, E = sz.E;
  auto opts = origin.options();
  Tensor d_origin = torch::empty_like(origin), dv_origin = torch::empty({O}, opts);
  Tensor d_matrices = torch::empty({nb, O, I}, opts);
  Tensor d_pattern_scales = torch::empty({nb, O}, opts);
  // Without the depthwise-separable branch (E = 0) its gradients are empty tensors.
  Tensor d_pw = torch::empty({O, I, E}, opts), dv_dws = torch::empty({E > 0 ? O : 0}, opts);
  Tensor g_t = with_transposed ? torch::empty({O, X, I}, opts) : torch::empty({0}, opts);
  const int threads = at::get_num_threads();
  // Depthwise gradients sum over output channels: one taps-first partial sum per thread.
  Tensor dwt = E > 0 ? depthwise->transpose(1, 2).contiguous() : torch::empty({0}, opts);
  Tensor ddwt_partial = torch::zeros({E > 0 ? threads : 0, I, X, E}, opts);

  const float *g = grad.data_ptr<float>(), *w0 = origin.data_ptr<float>();
  const float *v0 = origin_scale.data_ptr<float>();
  const float *a = ptr_or_null(pattern_matrices), *pat = ptr_or_null(patterns);
  const float* vs = ptr_or_null(pattern_scales);
  const float *pw = ptr_or_null(pointwise), *vd = ptr_or_null(dws_scale);
  const float* dwt_p = E > 0 ? dwt.data_ptr<float>() : nullptr;
  float *d0 = d_origin.data_ptr<float>(), *dv0 = dv_origin.data_ptr<float>();
  float *da = d_matrices.data_ptr<float>(), *dvs = d_pattern_scales.data_ptr<float>();
  float *dpw = d_pw.data_ptr<float>(), *dvd = dv_dws.data_ptr<float>();
  float* gt = with_transposed ? g_t.data_ptr<float>() : nullptr;
  float* ddwt_all = E > 0 ? ddwt_partial.data_ptr<float>() : nullptr;

  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    float* ddwt = ddwt_all == nullptr ? nullptr : ddwt_all + at::get_thread_num() * I * X * E;
    std::vector<float> acc_pattern(std::max<int64_t>(nb, 1));
    std::vector<float> acc_dws(std::max<int64_t>(E, 1));
    for (int64_t o = begin; o < end; ++o) {
      float acc0 = 0.f;
      std::fill(acc_pattern.begin(), acc_pattern.end(), 0.f);
      std::fill(acc_dws.begin(), acc_dws.end(), 0.f);
      branch_backward_channel(
          I, X, nb, E, g + o * I * X, w0 + o * I * X, v0[o], d0 + o * I * X, &acc0,
          a == nullptr ? nullptr : a + o * I, O * I, pat == nullptr ? nullptr : pat + o * X,
          O * X, vs == nullptr ? nullptr : vs + o, O, da + o * I, acc_pattern.data(),
          pw == nullptr ? nullptr : pw + o * I * E, dwt_p, vd == nullptr ? 0.f : vd[o],
          dpw + o * I * E, acc_dws.data(), ddwt, gt == nullptr ? nullptr : gt + o * X * I);
      dv0[o] = acc0;
      for (int64_t b = 0; b < nb; ++b) dvs[b * O + o] = acc_pattern[b];
      if (pw != nullptr) {
        float s = 0.f;
        for (int64_t e = 0; e < E; ++e) s += acc_dws[e];
        dvd[o] = s;
      }
    }
  });
  Tensor d_dw = E > 0 ? ddwt_partial.sum(0).transpose(1, 2).contiguous()
                      : torch::empty({0}, opts);
  return {d_origin, dv_origin, d_matrices, d_pattern_scales, d_pw, d_dw, dv_dws, g_t};
}

// (O, T, X) -> v[o] * C2 with its taps first, (O, X, T), for the composing products.
Tensor taps_first_scaled(const Tensor& expand_kxk_in, const Tensor& scale_in) {
  const Tensor expand_kxk = dense(expand_kxk_in, "expand_kxk"), scale = dense(scale_in, "scale");
  const int64_t O = expand_kxk.size(0), T = expand_kxk.size(1), X = expand_kxk.size(2);
  Tensor out = torch::empty({O, X, T}, expand_kxk.options());
  const float *s = expand_kxk.data_ptr<float>(), *v = scale.data_ptr<float>();
  float* d = out.data_ptr<float>();
  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t x = 0; x < X; ++x) d[(o * X + x) * T + t] = v[o] * s[(o * T + t) * X + x];
  });
  return out;
}

// (O, T, X) -> v[o] * C2 laid out (T, O, X), for the product that gives the first factor's
// gradient. A transpose of 9-float runs, done in tiles so that reads and writes both stay
// within a few pages.
Tensor t_major_scaled(const Tensor& expand_kxk_in, const Tensor& scale_in) {
  const Tensor expand_kxk = dense(expand_kxk_in, "expand_kxk"), scale = dense(scale_in, "scale");
  const int64_t O = expand_kxk.size(0), T = expand_kxk.size(1), X = expand_kxk.size(2);
  constexpr int64_t kTileO = 16, kTileT = 64;
  Tensor out = torch::empty({T, O, X}, expand_kxk.options());
  const float *s = expand_kxk.data_ptr<float>(), *v = scale.data_ptr<float>();
  float* d = out.data_ptr<float>();
  const int64_t o_tiles = (O + kTileO - 1) / kTileO;
  at::parallel_for(0, o_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t o0 = tile * kTileO, o1 = std::min(O, o0 + kTileO);
      for (int64_t t0 = 0; t0 < T; t0 += kTileT) {
        const int64_t t1 = std::min(T, t0 + kTileT);
        for (int64_t o = o0; o < o1; ++o)
          for (int64_t t = t0; t < t1; ++t)
            for (int64_t x = 0; x < X; ++x)
              d[(t * O + o) * X + x] = v[o] * s[(o * T + t) * X + x];
      }
    }
  });
  return out;
}

// From h (O, X, T), the unscaled gradient of C2 with its taps first: dC2 (O, T, X) and the
// gradient of the branch scale.
std::tuple<Tensor, Tensor> compose_backward(const Tensor& h_in, const Tensor& expand_kxk_in,
                                            const Tensor& expand_scale_in) {
  const Tensor h = dense(h_in, "h"), expand_kxk = dense(expand_kxk_in, "expand_kxk");
  const Tensor expand_scale = dense(expand_scale_in, "expand_scale");
  const int64_t O = expand_kxk.size(0), T = expand_kxk.size(1), X = expand_kxk.size(2);
  Tensor d_expand_kxk = torch::empty_like(expand_kxk);
  Tensor dv = torch::empty({O}, expand_kxk.options());
  const float *hp = h.data_ptr<float>(), *s = expand_kxk.data_ptr<float>();
  const float* v = expand_scale.data_ptr<float>();
  float *ds = d_expand_kxk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      float acc = 0.f;
      const float* ho = hp + o * X * T;
      const float* so = s + o * T * X;
      float* dso = ds + o * T * X;
      for (int64_t x = 0; x < X; ++x) {
        for (int64_t t = 0; t < T; ++t) {
          dso[t * X + x] = v[o] * ho[x * T + t];
          acc += ho[x * T + t] * so[t * X + x];
        }
      }
      dvp[o] = acc;
    }
  });
  return {d_expand_kxk, dv};
}

}  // namespace

// The loops are dispatcher ops, orepa_mm::kxk_*, so that torch.compile traces them as graph
// nodes (their fake kernels, for shapes, are in orepa_mm/cnn/fused_ops.py). Python calls them
// through torch.ops.orepa_mm; the module below only makes the library importable.
TORCH_LIBRARY_FRAGMENT(orepa_mm, m) {
  m.def("kxk_assemble(Tensor origin, Tensor origin_scale, Tensor? pattern_matrices, "
        "Tensor? patterns, Tensor? pattern_scales, Tensor? composed, Tensor? pointwise, "
        "Tensor? depthwise, Tensor? dws_scale) -> Tensor");
  m.def("kxk_branch_backward(Tensor grad, Tensor origin, Tensor origin_scale, "
        "Tensor? pattern_matrices, Tensor? patterns, Tensor? pattern_scales, Tensor? pointwise, "
        "Tensor? depthwise, Tensor? dws_scale, bool with_transposed) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("kxk_taps_first_scaled(Tensor expand_kxk, Tensor scale) -> Tensor");
  m.def("kxk_t_major_scaled(Tensor expand_kxk, Tensor scale) -> Tensor");
  m.def("kxk_compose_backward(Tensor h, Tensor expand_kxk, Tensor expand_scale) -> "
        "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(orepa_mm, CPU, m) {
  m.impl("kxk_assemble", &assemble);
  m.impl("kxk_branch_backward", &branch_backward);
  m.impl("kxk_taps_first_scaled", &taps_first_scaled);
  m.impl("kxk_t_major_scaled", &t_major_scaled);
  m.impl("kxk_compose_backward", &compose_backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU loops of the k x k OREPA kernel generator (float32, groups = 1), "
            "registered as the torch.ops.orepa_mm.kxk_* operators.";
  // Bumped when the operators change, so that a stale build is recognised (fused_ops.py).
  m.attr("OPS_VERSION") = 2;
}
