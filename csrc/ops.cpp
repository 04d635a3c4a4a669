#include "ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/utils.h"

#include "kernels.h"
#include "pool.h"

namespace cpu_ext {
namespace {

// ---------------------------------------------------------------- kernel selection

bool cpu_supports(const KernelSet* ks) {
  if (ks == &kernels_generic) {
    return true;
  }
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c");
  if (ks == &kernels_avx2) {
    return avx2;
  }
  if (ks == &kernels_avx512) {
    return avx2 && __builtin_cpu_supports("avx512f");
  }
#endif
  return false;
}

std::vector<const KernelSet*> all_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  return {&kernels_avx512, &kernels_avx2, &kernels_generic};
#else
  return {&kernels_generic};
#endif
}

const KernelSet* best_kernels() {
  for (auto* ks : all_kernels()) {
    if (cpu_supports(ks)) {
      return ks;
    }
  }
  return &kernels_generic;
}

std::atomic<const KernelSet*> g_kernels{best_kernels()};

// ---------------------------------------------------------------- argument checks

[[noreturn]] void bad(const std::string& op, const std::string& what) {
  throw std::invalid_argument("[cpu_ext." + op + "] " + what);
}

std::string shape_str(const mx::Shape& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    r += (i ? ", " : "") + std::to_string(s[i]);
  }
  return r + (s.size() == 1 ? ",)" : ")");
}

std::string dtype_str(mx::Dtype t) {
  std::ostringstream os;
  os << t;
  return os.str();
}

bool is_float(mx::Dtype t) {
  return t == mx::float32 || t == mx::bfloat16 || t == mx::float16;
}

mx::Stream cpu_stream(const std::string& op, mx::StreamOrDevice s) {
  mx::Stream st = mx::to_stream(s, mx::Device::cpu);
  if (st.device != mx::Device::cpu) {
    bad(op, "runs on the CPU only; pass a CPU stream (or none)");
  }
  return st;
}

void check_x(const std::string& op, const mx::array& x) {
  if (x.ndim() < 1) {
    bad(op, "x must have at least one dimension (its last is K), got a scalar");
  }
  if (!is_float(x.dtype())) {
    bad(op, "x must be float32, bfloat16 or float16, got " + dtype_str(x.dtype()));
  }
}

// Checks an affine-quantized matrix; returns K.
int check_quantized(
    const std::string& op,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits) {
  if (bits != 4 && bits != 8) {
    bad(op, "bits must be 4 or 8, got " + std::to_string(bits));
  }
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    bad(op, "group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  }
  if (w.ndim() != 2 || w.dtype() != mx::uint32) {
    bad(op,
        "w must be the uint32 [N, K * bits / 32] matrix mx.quantize returns, got " +
            dtype_str(w.dtype()) + " of shape " + shape_str(w.shape()));
  }
  int N = w.shape(0);
  int K = w.shape(1) * 32 / bits;
  if (K % group_size != 0) {
    bad(op,
        "w holds rows of K = " + std::to_string(K) + " values, not a multiple of group_size " +
            std::to_string(group_size));
  }
  mx::Shape sb = {N, K / group_size};
  for (auto* a : {&scales, &biases}) {
    const char* name = a == &scales ? "scales" : "biases";
    if (!is_float(a->dtype())) {
      bad(op,
          std::string(name) + " must be float32, bfloat16 or float16, got " +
              dtype_str(a->dtype()));
    }
    if (a->shape() != sb) {
      bad(op,
          std::string(name) + " must have shape " + shape_str(sb) + " for w of shape " +
              shape_str(w.shape()) + ", group_size " + std::to_string(group_size) +
              " and bits " + std::to_string(bits) + ", got " + shape_str(a->shape()));
    }
  }
  if (scales.dtype() != biases.dtype()) {
    bad(op,
        "scales and biases must have one dtype, got " + dtype_str(scales.dtype()) + " and " +
            dtype_str(biases.dtype()));
  }
  return K;
}

mx::Shape matmul_shape(const mx::array& x, int N) {
  mx::Shape s = x.shape();
  s.back() = N;
  return s;
}

// ---------------------------------------------------------------- reading inputs in the task

// What a task needs of an input array: its memory and layout.
struct View {
  const char* data;
  mx::Dtype dtype;
  mx::Shape shape;
  mx::Strides strides;
  bool contiguous;
};

View view_of(const mx::array& a) {
  return {a.data<char>(), a.dtype(), a.shape(), a.strides(), a.flags().row_contiguous};
}

int64_t offset_of(int64_t elem, const mx::Shape& shape, const mx::Strides& strides, int dims) {
  int64_t loc = 0;
  for (int i = dims - 1; i >= 0; --i) {
    loc += (elem % shape[i]) * strides[i];
    elem /= shape[i];
  }
  return loc;
}

// The view's elements in row-major order: its own memory, or a packed copy kept in `hold`.
const void* packed(const View& v, std::vector<char>& hold) {
  if (v.contiguous) {
    return v.data;
  }
  size_t item = mx::size_of(v.dtype);
  int64_t n = 1;
  for (int d : v.shape) {
    n *= d;
  }
  hold.resize(n * item);
  int dims = static_cast<int>(v.shape.size());
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(hold.data() + i * item, v.data + offset_of(i, v.shape, v.strides, dims) * item, item);
  }
  return hold.data();
}

float load_f32(const char* p, mx::Dtype t) {
  if (t == mx::float32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  if (t == mx::bfloat16) {
    return static_cast<float>(*reinterpret_cast<const mx::bfloat16_t*>(p));
  }
  return static_cast<float>(*reinterpret_cast<const mx::float16_t*>(p));
}

// x[..., K] as float32 rows [M][ldx] (zeros past K), plus the group sums when group > 0.
struct Activations {
  std::vector<float> x;
  std::vector<float> sums;
  int M = 0, K = 0, ldx = 0;
  bool finite = true;
};

Activations prepare_x(const View& v, int group) {
  Activations a;
  int dims = static_cast<int>(v.shape.size());
  a.K = v.shape.back();
  a.M = 1;
  for (int i = 0; i + 1 < dims; ++i) {
    a.M *= v.shape[i];
  }
  a.ldx = (a.K + kPad - 1) / kPad * kPad;
  a.x.assign(size_t(a.M) * a.ldx, 0.0f);
  size_t item = mx::size_of(v.dtype);
  int64_t sk = v.strides.back();
  for (int m = 0; m < a.M; ++m) {
    const char* row = v.data + offset_of(m, v.shape, v.strides, dims - 1) * item;
    float* dst = a.x.data() + size_t(m) * a.ldx;
    if (v.dtype == mx::float32 && sk == 1) {
      std::memcpy(dst, row, size_t(a.K) * 4);
    } else {
      for (int k = 0; k < a.K; ++k) {
        dst[k] = load_f32(row + k * sk * item, v.dtype);
      }
    }
  }
  if (group > 0) {
    int G = a.K / group;
    a.sums.resize(size_t(a.M) * G);
    for (int m = 0; m < a.M; ++m) {
      const float* row = a.x.data() + size_t(m) * a.ldx;
      for (int g = 0; g < G; ++g) {
        float s = 0.0f;
        for (int k = 0; k < group; ++k) {
          s += row[g * group + k];
        }
        a.sums[size_t(m) * G + g] = s;
        a.finite = a.finite && std::isfinite(s); // inf or nan anywhere in the group shows here
      }
    }
  }
  return a;
}

void store_from_f32(char* dst, mx::Dtype t, float f) {
  if (t == mx::float32) {
    std::memcpy(dst, &f, 4);
  } else if (t == mx::bfloat16) {
    *reinterpret_cast<mx::bfloat16_t*>(dst) = mx::bfloat16_t(f);
  } else {
    *reinterpret_cast<mx::float16_t*>(dst) = mx::float16_t(f);
  }
}

int scale_type_of(mx::Dtype t) {
  return t == mx::float32 ? S_F32 : t == mx::bfloat16 ? S_BF16 : S_F16;
}

// ---------------------------------------------------------------- running a matmul

struct MatmulJob {
  const KernelSet* ks;
  Problem p;
  int chunk; // output columns per task
  char* out; // [M][N] in out_dtype; p.out is it when that is float32
  mx::Dtype out_dtype = mx::float32;
};

void matmul_task(void* ctx, int i) {
  auto& j = *static_cast<MatmulJob*>(ctx);
  int n0 = i * j.chunk, n1 = std::min(j.p.N, n0 + j.chunk);
  thread_local std::vector<float> scratch;
  if (scratch.size() < scratch_floats(j.p)) {
    scratch.resize(scratch_floats(j.p));
  }
  j.ks->matmul(j.p, n0, n1, scratch.data());
  if (j.out_dtype != mx::float32) {
    size_t item = mx::size_of(j.out_dtype);
    for (int m = 0; m < j.p.M; ++m) {
      for (int n = n0; n < n1; ++n) {
        store_from_f32(
            j.out + (size_t(m) * j.p.N + n) * item, j.out_dtype, j.p.out[size_t(m) * j.p.ldo + n]);
      }
    }
  }
}

// Columns per task: a few tasks per thread so a thread slowed by other work is evened out,
// rounded to the kernels' blocks (4 rows for GEMV, 48-column superblocks for GEMM).
int chunk_columns(int N, int M) {
  int threads = num_threads();
  if (threads <= 1) {
    return N;
  }
  int align = M == 1 ? 16 : 48;
  int c = (N + threads * 4 - 1) / (threads * 4);
  c = (c + align - 1) / align * align;
  return std::max(c, align);
}

void run_matmul(
    const KernelSet* ks,
    const View& x,
    const View& w,
    const View* scales,
    const View* biases,
    int format,
    int group,
    char* out,
    mx::Dtype out_dtype) {
  bool quantized = format == W_Q4 || format == W_Q8;
  Activations a = prepare_x(x, quantized ? group : 0);
  std::vector<char> hold_w, hold_s, hold_b;
  std::vector<float> out_f32;
  MatmulJob job;
  job.ks = ks;
  Problem& p = job.p;
  p.M = a.M;
  p.N = w.shape[0];
  p.K = a.K;
  p.x = a.x.data();
  p.ldx = a.ldx;
  p.xsum = a.sums.data();
  p.x_finite = a.finite;
  p.format = format;
  p.w = packed(w, hold_w);
  p.scales = quantized ? packed(*scales, hold_s) : nullptr;
  p.biases = quantized ? packed(*biases, hold_b) : nullptr;
  p.scale_type = quantized ? scale_type_of(scales->dtype) : S_F32;
  p.group = group;
  if (out_dtype == mx::float32) {
    p.out = reinterpret_cast<float*>(out);
  } else {
    out_f32.resize(size_t(p.M) * p.N);
    p.out = out_f32.data();
  }
  p.ldo = p.N;
  p.kc = gemm_kc(p.M);
  job.chunk = chunk_columns(p.N, p.M);
  job.out = out;
  job.out_dtype = out_dtype;
  parallel_for((p.N + job.chunk - 1) / job.chunk, &matmul_task, &job);
}

struct DequantizeJob {
  const KernelSet* ks;
  Problem p;
  int chunk;
  float* out;
};

void dequantize_task(void* ctx, int i) {
  auto& j = *static_cast<DequantizeJob*>(ctx);
  int n0 = i * j.chunk, n1 = std::min(j.p.N, n0 + j.chunk);
  j.ks->dequantize(j.p, n0, n1, j.out, size_t(j.p.K));
}

// Allocates the output; false if it is empty (nothing to run).
bool allocate(mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  return out.size() > 0;
}

// The task keeps only raw views of the arrays; MLX keeps their buffers alive until the stream
// has run it, as for its own primitives (cpu::eval enqueues their release after the task).
template <class F>
void dispatch(mx::Stream stream, const std::vector<mx::array>& inputs, mx::array& out, F&& task) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (auto& a : inputs) {
    encoder.set_input_array(a);
  }
  encoder.set_output_array(out);
  encoder.dispatch(std::forward<F>(task));
}

[[noreturn]] void no_gpu(const char* name) {
  throw std::runtime_error(std::string("[cpu_ext] ") + name + " runs on the CPU stream only");
}


// ---------------------------------------------------------------- running a decode attention

struct AttentionJob {
  const KernelSet* ks;
  Attention a;
};

void attention_task(void* ctx, int i) {
  auto& j = *static_cast<AttentionJob*>(ctx);
  thread_local std::vector<float> scratch;
  size_t need = attention_scratch_floats(j.a);
  if (scratch.size() < need) {
    scratch.resize(need);
  }
  j.ks->attention(j.a, i, scratch.data());
}

// Keys a partition holds at least: below this, splitting a sequence costs more than it evens out.
constexpr int kMinPartKeys = 256;

// The partial results of a sequence's key partitions, merged into out [T][H][D]:
// out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p, M the largest m_p.
void merge_parts(const Attention& a) {
  const int G = a.H / a.KVH, D = a.D;
  const float inf = std::numeric_limits<float>::infinity();
  for (int u = 0; u < a.T * a.KVH; ++u) {
    for (int g = 0; g < G; ++g) {
      float M = -inf;
      for (int p = 0; p < a.parts; ++p) {
        M = std::max(M, a.ml[(size_t(u) * a.parts + p) * G * 2 + 2 * g]);
      }
      float* out = a.out + (size_t(u) * G + g) * D; // u = t * KVH + kvh: rows of heads kvh * G + g
      std::fill(out, out + D, 0.0f);
      float l = 0.0f;
      for (int p = 0; p < a.parts; ++p) {
        size_t task = size_t(u) * a.parts + p;
        float m = a.ml[task * G * 2 + 2 * g];
        if (m == -inf) {
          continue; // an empty partition (or one whose scores are all -inf): weight 0
        }
        float w = std::exp(m - M);
        l += w * a.ml[task * G * 2 + 2 * g + 1];
        const float* acc = a.acc + (task * G + g) * D;
        for (int d = 0; d < D; ++d) {
          out[d] += w * acc[d];
        }
      }
      const float inv = 1.0f / l; // no key at all: 0 / 0, NaN
      for (int d = 0; d < D; ++d) {
        out[d] *= inv;
      }
    }
  }
}

void run_attention(
    const KernelSet* ks,
    const View& q,
    const View& cache,
    const View& table,
    const View& pos,
    float scale,
    int window,
    float cap,
    char* out,
    mx::Dtype out_dtype) {
  const int T = q.shape[0], H = q.shape[1], D = q.shape[2];
  const int KVH = cache.shape[1], NB = cache.shape[2], BS = cache.shape[3];
  const int n = table.shape[1];
  // q as float32 rows [T][H][D], times the scale (any strides).
  std::vector<float> qf(size_t(T) * H * D);
  size_t qitem = mx::size_of(q.dtype);
  for (int r = 0; r < T * H; ++r) {
    const char* row = q.data + offset_of(r, q.shape, q.strides, 2) * qitem;
    for (int d = 0; d < D; ++d) {
      qf[size_t(r) * D + d] = load_f32(row + d * q.strides[2] * qitem, q.dtype) * scale;
    }
  }
  std::vector<char> hold_c, hold_t, hold_p;
  const void* cdata = packed(cache, hold_c);
  const int32_t* tdata = static_cast<const int32_t*>(packed(table, hold_t));
  const int32_t* pdata = static_cast<const int32_t*>(packed(pos, hold_p));
  // Positions the table covers, blocks inside the cache; else the sequence is marked invalid.
  std::vector<int32_t> p(T);
  int max_ctx = 0;
  for (int t = 0; t < T; ++t) {
    int pt = pdata[t];
    bool ok = pt >= 0 && pt < int64_t(n) * BS;
    if (ok) {
      int lo = window > 0 && pt - window + 1 > 0 ? pt - window + 1 : 0;
      for (int b = lo / BS; ok && b <= pt / BS; ++b) {
        int32_t id = tdata[size_t(t) * n + b];
        ok = id >= 0 && id < NB;
      }
    }
    p[t] = ok ? pt : -1;
    max_ctx = std::max(max_ctx, ok ? pt + 1 : 0);
  }
  AttentionJob job;
  job.ks = ks;
  Attention& a = job.a;
  a.T = T;
  a.H = H;
  a.KVH = KVH;
  a.D = D;
  a.q = qf.data();
  a.cache = cdata;
  a.cache_type = scale_type_of(cache.dtype);
  a.blocks = NB;
  a.block_size = BS;
  a.table = tdata;
  a.n = n;
  a.pos = p.data();
  a.window = window;
  a.cap = cap;
  // Partitions of the keys only where (sequence, KV head) pairs are too few to keep every thread busy.
  const int units = T * KVH, threads = num_threads();
  int parts = 1;
  if (units < 2 * threads && max_ctx > kMinPartKeys) {
    parts = std::min((4 * threads + units - 1) / units, (max_ctx + kMinPartKeys - 1) / kMinPartKeys);
  }
  int part_keys = std::max((max_ctx + parts - 1) / parts, 1);
  part_keys = (part_keys + BS - 1) / BS * BS;
  a.parts = parts > 1 ? (max_ctx + part_keys - 1) / part_keys : 1;
  a.part_keys = a.parts > 1 ? part_keys : std::max(max_ctx, 1);
  std::vector<float> out_f32, acc, ml;
  if (out_dtype == mx::float32) {
    a.out = reinterpret_cast<float*>(out);
  } else {
    out_f32.resize(size_t(T) * H * D);
    a.out = out_f32.data();
  }
  if (a.parts > 1) {
    acc.resize(size_t(units) * a.parts * H / KVH * D);
    ml.resize(size_t(units) * a.parts * H / KVH * 2);
    a.acc = acc.data();
    a.ml = ml.data();
  }
  parallel_for(units * a.parts, &attention_task, &job);
  if (a.parts > 1) {
    merge_parts(a);
  }
  if (out_dtype != mx::float32) {
    size_t item = mx::size_of(out_dtype);
    for (size_t i = 0; i < out_f32.size(); ++i) {
      store_from_f32(out + i * item, out_dtype, out_f32[i]);
    }
  }
}
} // namespace

// ---------------------------------------------------------------- ops

mx::array quantized_matmul(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s) {
  const std::string op = "quantized_matmul";
  check_x(op, x);
  int K = check_quantized(op, w, scales, biases, group_size, bits);
  if (x.shape(-1) != K) {
    bad(op,
        "x's last dimension is " + std::to_string(x.shape(-1)) + " but w holds rows of K = " +
            std::to_string(K) + " values (w " + shape_str(w.shape()) + ", bits " +
            std::to_string(bits) + ")");
  }
  mx::Dtype out_dtype = mx::promote_types(x.dtype(), scales.dtype());
  return mx::array(
      matmul_shape(x, w.shape(0)),
      out_dtype,
      std::make_shared<QuantizedMatmul>(cpu_stream(op, s), group_size, bits),
      {x, w, scales, biases});
}

mx::array linear(const mx::array& x, const mx::array& w, mx::StreamOrDevice s) {
  const std::string op = "linear";
  check_x(op, x);
  if (w.ndim() != 2 || !is_float(w.dtype())) {
    bad(op,
        "w must be a float32, bfloat16 or float16 matrix [N, K], got " + dtype_str(w.dtype()) +
            " of shape " + shape_str(w.shape()));
  }
  if (x.shape(-1) != w.shape(1)) {
    bad(op,
        "x's last dimension is " + std::to_string(x.shape(-1)) + " but w " +
            shape_str(w.shape()) + " has K = " + std::to_string(w.shape(1)));
  }
  if (w.shape(1) == 0) {
    bad(op, "K must be at least 1");
  }
  return mx::array(
      matmul_shape(x, w.shape(0)),
      mx::promote_types(x.dtype(), w.dtype()),
      std::make_shared<Linear>(cpu_stream(op, s)),
      {x, w});
}

mx::array dequantize(
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s) {
  const std::string op = "dequantize";
  int K = check_quantized(op, w, scales, biases, group_size, bits);
  return mx::array(
      {w.shape(0), K},
      mx::float32,
      std::make_shared<Dequantize>(cpu_stream(op, s), group_size, bits),
      {w, scales, biases});
}

mx::array paged_decode_attention(
    const mx::array& q,
    const mx::array& cache,
    const mx::array& blocks,
    const mx::array& pos,
    float scale,
    int window,
    float cap,
    mx::StreamOrDevice s) {
  const std::string op = "paged_decode_attention";
  if (q.ndim() != 3 || !is_float(q.dtype())) {
    bad(op,
        "q must be a float32, bfloat16 or float16 array [T, H, D], got " + dtype_str(q.dtype()) +
            " of shape " + shape_str(q.shape()));
  }
  const int T = q.shape(0), H = q.shape(1), D = q.shape(2);
  if (cache.ndim() != 5 || cache.shape(0) != 2 || cache.shape(4) != D || !is_float(cache.dtype())) {
    bad(op,
        "cache must be a float32, bfloat16 or float16 array [2, KVH, blocks, block_size, D] with "
        "D = " + std::to_string(D) + " (q's last dimension), got " + dtype_str(cache.dtype()) +
            " of shape " + shape_str(cache.shape()));
  }
  const int KVH = cache.shape(1);
  if (KVH < 1 || H % KVH != 0 || D < 1 || cache.shape(3) < 1) {
    bad(op,
        "q's " + std::to_string(H) + " heads must be a multiple of the cache's " +
            std::to_string(KVH) + " KV heads, with D and block_size at least 1 (q " +
            shape_str(q.shape()) + ", cache " + shape_str(cache.shape()) + ")");
  }
  if (blocks.ndim() != 2 || blocks.dtype() != mx::int32 || blocks.shape(0) != T ||
      blocks.shape(1) < 1) {
    bad(op,
        "blocks must be an int32 block table [T, n] with T = " + std::to_string(T) +
            " rows and n >= 1, got " + dtype_str(blocks.dtype()) + " of shape " +
            shape_str(blocks.shape()));
  }
  if (pos.dtype() != mx::int32 || pos.size() != size_t(T) || (pos.ndim() == 2 && pos.shape(0) != T) ||
      pos.ndim() > 2) {
    bad(op,
        "pos must hold one int32 position per sequence ([T] or [T, 1], T = " + std::to_string(T) +
            "), got " + dtype_str(pos.dtype()) + " of shape " + shape_str(pos.shape()));
  }
  if (!(cap >= 0.0f) || !std::isfinite(scale)) {
    bad(op, "scale must be finite and cap >= 0 (0: no soft-capping)");
  }
  return mx::array(
      {T, H * D},
      q.dtype(),
      std::make_shared<PagedDecodeAttention>(cpu_stream(op, s), scale, window, cap),
      {q, cache, blocks, pos});
}

std::string isa() {
  return g_kernels.load()->name;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (auto* ks : all_kernels()) {
    if (cpu_supports(ks)) {
      names.emplace_back(ks->name);
    }
  }
  return names;
}

void set_isa(const std::string& name) {
  for (auto* ks : all_kernels()) {
    if (name == ks->name) {
      if (!cpu_supports(ks)) {
        bad("set_isa", "this CPU cannot run the " + name + " kernels");
      }
      g_kernels.store(ks);
      return;
    }
  }
  std::string known;
  for (auto* ks : all_kernels()) {
    known += std::string(known.empty() ? "" : ", ") + ks->name;
  }
  bad("set_isa", "unknown kernel set " + name + "; this build has " + known);
}

// ---------------------------------------------------------------- primitives

void QuantizedMatmul::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  if (!allocate(out)) {
    return;
  }
  dispatch(
      stream(),
      inputs,
      out,
      [ks = g_kernels.load(),
       x = view_of(inputs[0]),
       w = view_of(inputs[1]),
       scales = view_of(inputs[2]),
       biases = view_of(inputs[3]),
       format = bits_ == 4 ? W_Q4 : W_Q8,
       group = group_size_,
       dst = out.data<char>(),
       dtype = out.dtype()]() {
        run_matmul(ks, x, w, &scales, &biases, format, group, dst, dtype);
      });
}

void QuantizedMatmul::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  no_gpu(name());
}

bool QuantizedMatmul::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const QuantizedMatmul&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

std::vector<mx::Shape> QuantizedMatmul::output_shapes(const std::vector<mx::array>& inputs) {
  return {matmul_shape(inputs[0], inputs[1].shape(0))};
}

void Linear::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  if (!allocate(out)) {
    return;
  }
  mx::Dtype wt = inputs[1].dtype();
  int format = wt == mx::float32 ? W_F32 : wt == mx::bfloat16 ? W_BF16 : W_F16;
  dispatch(
      stream(),
      inputs,
      out,
      [ks = g_kernels.load(),
       x = view_of(inputs[0]),
       w = view_of(inputs[1]),
       format,
       dst = out.data<char>(),
       dtype = out.dtype()]() { run_matmul(ks, x, w, nullptr, nullptr, format, 0, dst, dtype); });
}

void Linear::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  no_gpu(name());
}

std::vector<mx::Shape> Linear::output_shapes(const std::vector<mx::array>& inputs) {
  return {matmul_shape(inputs[0], inputs[1].shape(0))};
}

void Dequantize::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  if (!allocate(out)) {
    return;
  }
  dispatch(
      stream(),
      inputs,
      out,
      [ks = g_kernels.load(),
       w = view_of(inputs[0]),
       scales = view_of(inputs[1]),
       biases = view_of(inputs[2]),
       format = bits_ == 4 ? W_Q4 : W_Q8,
       group = group_size_,
       dst = out.data<float>(),
       K = out.shape(1)]() {
        std::vector<char> hold_w, hold_s, hold_b;
        DequantizeJob job;
        job.ks = ks;
        Problem& p = job.p;
        p = Problem{};
        p.N = w.shape[0];
        p.K = K;
        p.format = format;
        p.w = packed(w, hold_w);
        p.scales = packed(scales, hold_s);
        p.biases = packed(biases, hold_b);
        p.scale_type = scale_type_of(scales.dtype);
        p.group = group;
        job.chunk = chunk_columns(p.N, 1);
        job.out = dst;
        parallel_for((p.N + job.chunk - 1) / job.chunk, &dequantize_task, &job);
      });
}

void Dequantize::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  no_gpu(name());
}

bool Dequantize::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const Dequantize&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

std::vector<mx::Shape> Dequantize::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[0].shape(1) * 32 / bits_}};
}

void PagedDecodeAttention::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  if (!allocate(out)) {
    return;
  }
  dispatch(
      stream(),
      inputs,
      out,
      [ks = g_kernels.load(),
       q = view_of(inputs[0]),
       cache = view_of(inputs[1]),
       table = view_of(inputs[2]),
       pos = view_of(inputs[3]),
       scale = scale_,
       window = window_,
       cap = cap_,
       dst = out.data<char>(),
       dtype = out.dtype()]() {
        run_attention(ks, q, cache, table, pos, scale, window, cap, dst, dtype);
      });
}

void PagedDecodeAttention::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  no_gpu(name());
}

bool PagedDecodeAttention::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const PagedDecodeAttention&>(other);
  return scale_ == o.scale_ && window_ == o.window_ && cap_ == o.cap_;
}

std::vector<mx::Shape> PagedDecodeAttention::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[0].shape(1) * inputs[0].shape(2)}};
}

} // namespace cpu_ext
