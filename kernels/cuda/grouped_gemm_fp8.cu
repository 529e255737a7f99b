// Petrel's fp8 block-scaled GEMMs on sm_90a: dense, grouped-contiguous and grouped-masked.
//
// Layout: A e4m3 [rows, K], A scales float [K/128][ld(rows)], B e4m3 [groups, N, K],
//         B scales float [groups, ceil(N/128), K/128], D bf16 [rows, N] (fp8_layout.hpp).
// Bound:  compute for prefill shapes (M in thousands), weight bandwidth for decode shapes.
//
// Design (docs/cuda-kernels.md):
//  * One CTA = 3 warpgroups. Warpgroup 0 is the producer: one thread issues TMA loads
//    (cp.async.bulk.tensor, 128B swizzle) of the A tile (128 x 128 fp8), the B tile (BLOCK_N x 128 fp8)
//    and the tile's 128 A scales for one K block into a ring of shared-memory stages, each guarded by
//    a "full" and an "empty" mbarrier. Warpgroups 1 and 2 are consumers, 64 rows each.
//  * Per 128-wide K block a consumer issues 4 wgmma m64nNk32 (e4m3, fp32 accumulate) into a fresh
//    accumulator, waits for them, releases the stage, then promotes: total += acc * sa[row] * sb.
//    Accumulating each K block separately and scaling in fp32 is the block-scaled math, and it also
//    sidesteps the tensor cores' reduced-precision fp8 accumulation over long K.
//  * Persistent grid (one CTA per SM) walking tiles in a rasterised order, so the producer loads the
//    next tile while the consumers run the epilogue of the current one.
//  * setmaxnreg moves registers from the producer (40) to the consumers (232).
#include "kernels/cuda/grouped_gemm_fp8.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <string>

#include "kernels/cuda/sm90_ptx.cuh"

namespace petrel::cuda {
namespace {

using namespace sm90;

// -- constants --------------------------------------------------------------------------
constexpr int block_m = 128;               // rows per tile (two consumer warpgroups x 64)
constexpr int block_k = 128;               // K per stage = one scale block = one 128B swizzle row of fp8
constexpr int num_threads = 384;           // producer warpgroup + 2 consumer warpgroups
constexpr int consumer_warps = 8;
constexpr int raster_n = 8;                // n-blocks per rasterisation column
constexpr int smem_limit = 227 * 1024;
constexpr int max_masked_groups = 1024;    // per-CTA prefix table of the masked layout (static smem)

enum class gemm_mode : int { dense = 0, contiguous = 1, masked = 2 };

struct gemm_params {
  gemm_mode mode;
  int num_groups;
  int m_rows;          // rows of A viewed as 2D (dense m, contiguous m_total, masked groups * max_m)
  int max_m;           // masked only
  int n;
  int k;
  int m_blocks;        // dense/contiguous: ceil(m_rows/128); masked: groups * ceil(max_m/128)
  int m_blocks_per_group;
  int n_blocks;
  int num_tiles;
  int paired_promotion; // 1: promote K blocks in pairs (BLOCK_N <= 128), 0: one by one
  const int* m_indices;
  const int* masked_m;
  const float* b_scales;
  __nv_bfloat16* d;
};

template <int BLOCK_N>
struct tile_config {
  static constexpr int a_bytes = block_m * block_k;
  static constexpr int b_bytes = BLOCK_N * block_k;
  static constexpr int sa_bytes = block_m * 4;
  static constexpr int stage_bytes = a_bytes + b_bytes + sa_bytes;
  static constexpr int stages = std::min(8, (smem_limit - 1024 - 4 * (max_masked_groups + 1) - 256) / stage_bytes);
  static constexpr int smem_bytes = stages * stage_bytes + stages * 16 + 1024; // + barriers + alignment slack
  static constexpr int acc_regs = BLOCK_N / 2;
};

// -- device helpers: wgmma ----------------------------------------------------------------
template <int BLOCK_N>
__device__ __forceinline__ void wgmma_k32(float (&d)[BLOCK_N / 2], std::uint64_t desc_a, std::uint64_t desc_b, int scale_d) {
  if constexpr (BLOCK_N == 192) wgmma_m64n192k32_e4m3(d, desc_a, desc_b, scale_d);
  else if constexpr (BLOCK_N == 128) wgmma_m64n128k32_e4m3(d, desc_a, desc_b, scale_d);
  else wgmma_m64n64k32_e4m3(d, desc_a, desc_b, scale_d);
}

// -- device helpers: tile schedule ------------------------------------------------------
struct tile_coord {
  int a_row0;     // first row of the tile in A (and D) viewed as 2D
  int group;      // expert
  int n0;         // first output column
  int rows_valid; // dense/masked: rows of the tile to store; contiguous: rows inside A
  bool skip;
};

// Rasterised order: columns of raster_n n-blocks; inside a column, the n-blocks of one m-block are
// consecutive, so CTAs running at the same time share A tiles and a narrow band of B in L2.
// Masked layout: only the m-blocks that hold rows are enumerated (group_prefix[g] = first such block of
// group g, computed per CTA from the device counts), so every CTA gets an even share of real work.
template <int BLOCK_N>
__device__ __forceinline__ tile_coord decode_tile(const gemm_params& p, int m_blocks, const int* group_prefix, int t) {
  const int per_column = m_blocks * raster_n;
  const int column = t / per_column;
  const int first_n = column * raster_n;
  const int width = min(raster_n, p.n_blocks - first_n);
  const int r = t - column * per_column;
  const int mb = r / width;
  const int nb = first_n + r % width;
  tile_coord c;
  c.n0 = nb * BLOCK_N;
  c.skip = false;
  if (p.mode == gemm_mode::masked) {
    int lo = 0, hi = p.num_groups - 1; // last group whose first block is <= mb
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (group_prefix[mid] <= mb) lo = mid; else hi = mid - 1;
    }
    const int g = lo;
    const int local0 = (mb - group_prefix[g]) * block_m;
    const int count = min(max(__ldg(p.masked_m + g), 0), p.max_m);
    c.group = g;
    c.a_row0 = g * p.max_m + local0;
    c.rows_valid = min(block_m, count - local0);
  } else {
    c.a_row0 = mb * block_m;
    c.rows_valid = min(block_m, p.m_rows - c.a_row0);
    if (p.mode == gemm_mode::contiguous) {
      c.group = __ldg(p.m_indices + c.a_row0);
      c.skip = c.group < 0 || c.group >= p.num_groups;
    } else {
      c.group = 0;
    }
  }
  return c;
}

// Masked layout: group_prefix[g] = number of 128-row blocks holding rows in groups < g; [G] = total.
// One warp: each lane sums a chunk of groups, then a warp scan stitches the chunks.
__device__ __forceinline__ void build_group_prefix(const gemm_params& p, int* group_prefix) {
  const int lane = threadIdx.x % 32;
  const int chunk = (p.num_groups + 31) / 32;
  const int begin = min(lane * chunk, p.num_groups), end = min(begin + chunk, p.num_groups);
  auto blocks_of = [&](int g) {
    const int count = min(max(__ldg(p.masked_m + g), 0), p.max_m);
    return (count + block_m - 1) / block_m;
  };
  int local = 0;
  for (int g = begin; g < end; ++g) local += blocks_of(g);
  int inclusive = local;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += y;
  }
  int running = inclusive - local;
  for (int g = begin; g < end; ++g) {
    group_prefix[g] = running;
    running += blocks_of(g);
  }
  if (lane == 31) group_prefix[p.num_groups] = inclusive;
}

// -- kernel -----------------------------------------------------------------------------
template <int BLOCK_N>
__global__ void __launch_bounds__(num_threads, 1)
fp8_gemm_nt_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                   const __grid_constant__ CUtensorMap map_sa, const gemm_params p) {
  using cfg = tile_config<BLOCK_N>;
  constexpr int stages = cfg::stages;
  extern __shared__ std::uint8_t smem_raw[];
  std::uint8_t* smem = reinterpret_cast<std::uint8_t*>((reinterpret_cast<std::uintptr_t>(smem_raw) + 1023) & ~std::uintptr_t(1023));
  std::uint8_t* smem_a = smem;
  std::uint8_t* smem_b = smem_a + stages * cfg::a_bytes;
  float* smem_sa = reinterpret_cast<float*>(smem_b + stages * cfg::b_bytes);
  std::uint64_t* full = reinterpret_cast<std::uint64_t*>(smem_sa + stages * block_m);
  std::uint64_t* empty = full + stages;

  __shared__ int group_prefix[max_masked_groups + 1];

  const int warpgroup = threadIdx.x / 128;
  const int k_blocks = p.k / block_k;
  if (p.mode == gemm_mode::masked && threadIdx.x >= 32 && threadIdx.x < 64) build_group_prefix(p, group_prefix);

  if (threadIdx.x == 0) {
    tma_prefetch_descriptor(&map_a);
    tma_prefetch_descriptor(&map_b);
    tma_prefetch_descriptor(&map_sa);
#pragma unroll
    for (int s = 0; s < stages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], consumer_warps);
    }
    fence_barrier_init();
    fence_proxy_async();
  }
  __syncthreads();
  const int m_blocks = p.mode == gemm_mode::masked ? group_prefix[p.num_groups] : p.m_blocks;
  const int num_tiles = m_blocks * p.n_blocks;

  if (warpgroup == 0) {
    // ---- producer ----
    setmaxnreg_dec<40>();
    if (threadIdx.x == 0) {
      int stage = 0;
      std::uint32_t phase = 0;
      for (int t = blockIdx.x; t < num_tiles; t += gridDim.x) {
        const tile_coord c = decode_tile<BLOCK_N>(p, m_blocks, group_prefix, t);
        if (c.skip) continue;
        const int b_row0 = c.group * p.n + c.n0;
        for (int kb = 0; kb < k_blocks; ++kb) {
          mbar_wait(&empty[stage], phase ^ 1);
          mbar_arrive_expect_tx(&full[stage], cfg::stage_bytes);
          tma_load_2d(&map_a, smem_a + stage * cfg::a_bytes, &full[stage], kb * block_k, c.a_row0);
          tma_load_2d(&map_b, smem_b + stage * cfg::b_bytes, &full[stage], kb * block_k, b_row0);
          tma_load_2d(&map_sa, smem_sa + stage * block_m, &full[stage], c.a_row0, kb);
          if (++stage == stages) { stage = 0; phase ^= 1; }
        }
      }
    }
  } else {
    // ---- consumers ----
    setmaxnreg_inc<232>();
    const int cw = warpgroup - 1;                    // which 64-row half of the tile
    const int warp = (threadIdx.x / 32) % 4;
    const int lane = threadIdx.x % 32;
    const int row_in_tile = cw * 64 + warp * 16 + lane / 4; // this thread's rows: row_in_tile and +8
    const int n_scale_blocks = (p.n + block_k - 1) / block_k;
    float acc[cfg::acc_regs];
    float acc2[BLOCK_N <= 128 ? cfg::acc_regs : 1]; // second accumulator of the paired promotion
    float total[cfg::acc_regs];
#pragma unroll
    for (int i = 0; i < cfg::acc_regs; ++i) acc[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < (BLOCK_N <= 128 ? cfg::acc_regs : 1); ++i) acc2[i] = 0.0f;
    int stage = 0;
    std::uint32_t phase = 0;
    for (int t = blockIdx.x; t < num_tiles; t += gridDim.x) {
      const tile_coord c = decode_tile<BLOCK_N>(p, m_blocks, group_prefix, t);
      if (c.skip) continue;
      // A tile wider than 128 (or not 128-aligned) straddles two weight-scale blocks: columns at or past
      // `split` (tile-relative) use the second one.
      const int split = block_k - c.n0 % block_k;
      const bool has_second = BLOCK_N > split && c.n0 / block_k + 1 < n_scale_blocks;
      const float* sb_ptr = p.b_scales + (static_cast<std::int64_t>(c.group) * n_scale_blocks + c.n0 / block_k) * k_blocks;
#pragma unroll
      for (int i = 0; i < cfg::acc_regs; ++i) total[i] = 0.0f;
      struct block_scales { float s0, s1, s0_hi, s1_hi; int stage; };
      // Waits for K block kb's stage and issues its 4 wgmmas into `dst` (not waited for).
      auto issue = [&](float (&dst)[cfg::acc_regs], int kb) -> block_scales {
        const float sb = __ldg(sb_ptr + kb);
        const float sb_hi = has_second ? __ldg(sb_ptr + k_blocks + kb) : sb;
        mbar_wait(&full[stage], phase);
        const float* sa = smem_sa + stage * block_m;
        const float sa0 = sa[row_in_tile];
        const float sa1 = sa[row_in_tile + 8];
        const std::uint64_t desc_a = desc_k_major(smem_a + stage * cfg::a_bytes + cw * 64 * block_k);
        const std::uint64_t desc_b = desc_k_major(smem_b + stage * cfg::b_bytes);
        fence_registers(dst);
        wgmma_fence();
#pragma unroll
        for (int i = 0; i < block_k / 32; ++i) wgmma_k32<BLOCK_N>(dst, desc_a + 2 * i, desc_b + 2 * i, i > 0 ? 1 : 0);
        wgmma_commit();
        const block_scales out{sa0 * sb, sa1 * sb, sa0 * sb_hi, sa1 * sb_hi, stage};
        if (++stage == stages) { stage = 0; phase ^= 1; }
        return out;
      };
      // After src's wgmmas completed: release the stage, then total += src * sa * sb.
      auto retire = [&](float (&src)[cfg::acc_regs], const block_scales& sc) {
        fence_registers(src);
        if (lane == 0) mbar_arrive(&empty[sc.stage]);
#pragma unroll
        for (int j = 0; j < cfg::acc_regs / 4; ++j) {
          const bool hi = j * 8 >= split; // uniform across the 8 columns of fragment j (split is a multiple of 64)
          const float r0 = hi ? sc.s0_hi : sc.s0, r1 = hi ? sc.s1_hi : sc.s1;
          total[4 * j + 0] = fmaf(src[4 * j + 0], r0, total[4 * j + 0]);
          total[4 * j + 1] = fmaf(src[4 * j + 1], r0, total[4 * j + 1]);
          total[4 * j + 2] = fmaf(src[4 * j + 2], r1, total[4 * j + 2]);
          total[4 * j + 3] = fmaf(src[4 * j + 3], r1, total[4 * j + 3]);
        }
      };
      int kb = 0;
      if constexpr (BLOCK_N <= 128) {
        // Paired promotion: issue two K blocks into two accumulators, promote the first while the
        // second's wgmmas run, then the second. Nothing stays in flight across iterations, which is
        // the form ptxas accepts without serialising the wgmmas (warning C7514 otherwise).
        if (p.paired_promotion) {
          for (; kb + 1 < k_blocks; kb += 2) {
            const block_scales first = issue(acc, kb);
            const block_scales second = issue(acc2, kb + 1);
            wgmma_wait<1>();
            retire(acc, first);
            wgmma_wait<0>();
            retire(acc2, second);
          }
        }
      }
      for (; kb < k_blocks; ++kb) {
        const block_scales sc = issue(acc, kb);
        wgmma_wait<0>();
        retire(acc, sc);
      }
      // ---- epilogue: fp32 -> bf16, straight from registers ----
      bool valid[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = row_in_tile + 8 * h;
        if (p.mode == gemm_mode::contiguous)
          valid[h] = r < c.rows_valid && __ldg(p.m_indices + c.a_row0 + r) == c.group;
        else
          valid[h] = r < c.rows_valid;
      }
      const int col_base = c.n0 + (lane % 4) * 2;
#pragma unroll
      for (int j = 0; j < cfg::acc_regs / 4; ++j) {
        const int col = col_base + j * 8;
        if (col >= p.n) continue;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (!valid[h]) continue;
          const std::int64_t row = c.a_row0 + row_in_tile + 8 * h;
          *reinterpret_cast<__nv_bfloat162*>(p.d + row * p.n + col) =
              __floats2bfloat162_rn(total[4 * j + 2 * h], total[4 * j + 2 * h + 1]);
        }
      }
    }
  }
}

// -- launcher ---------------------------------------------------------------------------
int block_n_override = 0;
bool paired_promotion = true;

int pick_block_n(std::int64_t m_blocks, std::int64_t n) {
  if (block_n_override == 64 || block_n_override == 128 || block_n_override == 192) return block_n_override;
  // Relative throughput model: shared-memory traffic per MAC (TMA writes of A and B plus each consumer
  // warpgroup's wgmma reads of its A half and the whole B, against 128 B/clk/SM) caps a 128 x BN tile
  // at about 0.58 / 0.80 of the tensor-core peak for BN = 64 / 128; multiply by the share of columns
  // that are real and by how full the last wave of tiles is. BN = 192 (model 0.92) measured no faster
  // than 128 on the H100 (docs/cuda-kernels.md) and quantises waves worse, so it is only an override.
  const int sms = sm_count();
  int best = 128;
  double best_score = -1;
  for (int bn : {64, 128}) {
    const double smem_cap = bn == 64 ? 0.58 : 0.80;
    const std::int64_t n_blocks = (n + bn - 1) / bn;
    const std::int64_t tiles = m_blocks * n_blocks;
    const double waves = static_cast<double>((tiles + sms - 1) / sms);
    const double score = smem_cap * (static_cast<double>(n) / (n_blocks * bn)) * (tiles / (waves * sms));
    if (score > best_score + 1e-9) { best_score = score; best = bn; }
  }
  return best;
}

template <int BLOCK_N>
kernel_status launch(gemm_params p, const void* a_fp8, const float* a_scales, const void* b_fp8, cudaStream_t stream,
                     const char* name) {
  using cfg = tile_config<BLOCK_N>;
  p.n_blocks = (p.n + BLOCK_N - 1) / BLOCK_N;
  p.num_tiles = p.m_blocks * p.n_blocks;
  if (p.num_tiles == 0) return kernel_status::success();
  CUtensorMap map_a, map_b, map_sa;
  const std::int64_t ld = fp8_scale_ld(p.m_rows);
  if (!encode_tma_2d(&map_a, CU_TENSOR_MAP_DATA_TYPE_UINT8, a_fp8, p.k, p.m_rows, p.k, block_k, block_m,
                 CU_TENSOR_MAP_SWIZZLE_128B) ||
      !encode_tma_2d(&map_b, CU_TENSOR_MAP_DATA_TYPE_UINT8, b_fp8, p.k, static_cast<std::uint64_t>(p.num_groups) * p.n, p.k,
                 block_k, BLOCK_N, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !encode_tma_2d(&map_sa, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, a_scales, p.m_rows, p.k / block_k, ld * 4, block_m, 1,
                 CU_TENSOR_MAP_SWIZZLE_NONE))
    return kernel_status::failure(std::string(name) + ": cannot encode a TMA descriptor (driver entry point missing or bad alignment)");
  if (const cudaError_t err = raise_smem_limit_once<fp8_gemm_nt_kernel<BLOCK_N>>(cfg::smem_bytes); err != cudaSuccess)
    return kernel_status::failure(std::string(name) + ": cannot raise the shared-memory limit: " + cudaGetErrorString(err));
  const int grid = std::min(p.num_tiles, sm_count());
  fp8_gemm_nt_kernel<BLOCK_N><<<grid, num_threads, cfg::smem_bytes, stream>>>(map_a, map_b, map_sa, p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return kernel_status::failure(std::string(name) + ": launch failed: " + cudaGetErrorString(err));
  return kernel_status::success();
}

kernel_status check_common(const char* name, const void* a, const float* sa, const void* b, const float* sb, void* d,
                           std::int64_t rows, std::int64_t n, std::int64_t k, int groups) {
  const std::string who(name);
  if (k <= 0 || k % block_k != 0) return kernel_status::failure(who + ": k=" + std::to_string(k) + " must be a positive multiple of 128");
  if (n <= 0 || n % 8 != 0) return kernel_status::failure(who + ": n=" + std::to_string(n) + " must be a positive multiple of 8");
  if (groups <= 0) return kernel_status::failure(who + ": num_groups must be positive");
  if (rows < 0 || rows > INT_MAX - block_m || static_cast<std::int64_t>(groups) * n > INT_MAX || k > INT_MAX)
    return kernel_status::failure(who + ": shape too large for 32-bit tile coordinates");
  if (rows > 0 && (!a || !sa || !b || !sb || !d)) return kernel_status::failure(who + ": null pointer");
  return kernel_status::success();
}

} // namespace

void set_grouped_gemm_block_n_override(int block_n) { block_n_override = block_n; }
void set_grouped_gemm_paired_promotion(bool enabled) { paired_promotion = enabled; }

grouped_gemm_config grouped_gemm_config_for(std::int64_t m_blocks, std::int64_t n) {
  grouped_gemm_config c;
  c.block_n = pick_block_n(m_blocks, n);
  c.stages = c.block_n == 192 ? tile_config<192>::stages : c.block_n == 128 ? tile_config<128>::stages : tile_config<64>::stages;
  c.tiles = static_cast<int>(m_blocks * ((n + c.block_n - 1) / c.block_n));
  c.ctas = std::min(c.tiles, sm_count());
  return c;
}

static kernel_status dispatch(gemm_params p, const void* a, const float* sa, const void* b, cudaStream_t stream, const char* name) {
  p.paired_promotion = paired_promotion ? 1 : 0;
  if (p.mode == gemm_mode::masked && p.num_groups > max_masked_groups)
    return kernel_status::failure(std::string(name) + ": at most " + std::to_string(max_masked_groups) + " groups");
  switch (pick_block_n(p.m_blocks, p.n)) {
    case 64: return launch<64>(p, a, sa, b, stream, name);
    case 192: return launch<192>(p, a, sa, b, stream, name);
    default: return launch<128>(p, a, sa, b, stream, name);
  }
}

kernel_status fp8_gemm_nt(const void* a_fp8, const float* a_scales, std::int64_t m, const void* b_fp8,
                          const float* b_scales, std::int64_t n, std::int64_t k, void* d_bf16, cudaStream_t stream) {
  if (auto s = check_common("fp8_gemm_nt", a_fp8, a_scales, b_fp8, b_scales, d_bf16, m, n, k, 1); !s.ok()) return s;
  if (m == 0) return kernel_status::success();
  gemm_params p{};
  p.mode = gemm_mode::dense;
  p.num_groups = 1;
  p.m_rows = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.m_blocks = static_cast<int>((m + block_m - 1) / block_m);
  p.m_blocks_per_group = p.m_blocks;
  p.b_scales = b_scales;
  p.d = static_cast<__nv_bfloat16*>(d_bf16);
  return dispatch(p, a_fp8, a_scales, b_fp8, stream, "fp8_gemm_nt");
}

kernel_status m_grouped_fp8_gemm_nt_contiguous(const void* a_fp8, const float* a_scales, std::int64_t m_total,
                                               const int* m_indices, const void* b_fp8, const float* b_scales,
                                               int num_groups, std::int64_t n, std::int64_t k, void* d_bf16,
                                               cudaStream_t stream) {
  const char* name = "m_grouped_fp8_gemm_nt_contiguous";
  if (auto s = check_common(name, a_fp8, a_scales, b_fp8, b_scales, d_bf16, m_total, n, k, num_groups); !s.ok()) return s;
  if (m_total % block_m != 0)
    return kernel_status::failure(std::string(name) + ": m_total=" + std::to_string(m_total) + " must be a multiple of 128");
  if (m_total == 0) return kernel_status::success();
  if (!m_indices) return kernel_status::failure(std::string(name) + ": m_indices is null");
  gemm_params p{};
  p.mode = gemm_mode::contiguous;
  p.num_groups = num_groups;
  p.m_rows = static_cast<int>(m_total);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.m_blocks = static_cast<int>(m_total / block_m);
  p.m_blocks_per_group = p.m_blocks;
  p.m_indices = m_indices;
  p.b_scales = b_scales;
  p.d = static_cast<__nv_bfloat16*>(d_bf16);
  return dispatch(p, a_fp8, a_scales, b_fp8, stream, name);
}

kernel_status m_grouped_fp8_gemm_nt_masked(const void* a_fp8, const float* a_scales, int num_groups,
                                           std::int64_t max_m, const int* masked_m, const void* b_fp8,
                                           const float* b_scales, std::int64_t n, std::int64_t k, void* d_bf16,
                                           cudaStream_t stream) {
  const char* name = "m_grouped_fp8_gemm_nt_masked";
  if (max_m < 0) return kernel_status::failure(std::string(name) + ": max_m must be >= 0");
  const std::int64_t rows = static_cast<std::int64_t>(num_groups) * max_m;
  if (auto s = check_common(name, a_fp8, a_scales, b_fp8, b_scales, d_bf16, rows, n, k, num_groups); !s.ok()) return s;
  if (rows == 0) return kernel_status::success();
  if (!masked_m) return kernel_status::failure(std::string(name) + ": masked_m is null");
  gemm_params p{};
  p.mode = gemm_mode::masked;
  p.num_groups = num_groups;
  p.m_rows = static_cast<int>(rows);
  p.max_m = static_cast<int>(max_m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.m_blocks_per_group = static_cast<int>((max_m + block_m - 1) / block_m);
  p.m_blocks = num_groups * p.m_blocks_per_group;
  p.masked_m = masked_m;
  p.b_scales = b_scales;
  p.d = static_cast<__nv_bfloat16*>(d_bf16);
  return dispatch(p, a_fp8, a_scales, b_fp8, stream, name);
}

} // namespace petrel::cuda
