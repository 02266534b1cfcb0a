/* Paged attention on the CPU: K/V read in place through block tables, online softmax.
 *
 * One entry point covers decode, prefill and a packed mix of both (varlen): queries are packed
 * (N, H, D); sequence s owns query rows [cu[s], cu[s+1]) (or row s alone when cu is NULL: decode)
 * and sees the slots [starts[s], ends[s]) of the concatenation of its blocks tables[s, 0..]; its
 * query j of n_s is causal: it sees [starts[s], ends[s] - n_s + j + 1).
 *
 * Work item = (tile of <= TQ consecutive queries of one sequence, kv head). A K/V block is read
 * once per item for all TQ * G query heads that share it (G = H / Hkv, heads h = kv * G + g), so
 * decode reads every byte of K/V once, like contiguous attention; nothing is gathered.
 * Accumulation is fp32; bf16 K/V rows are widened as they are loaded. head_dim a multiple of 16
 * (<= 256) takes the vector path (GCC/Clang vector types: AVX-512, AVX2 or NEON, whatever -march
 * gives), any other head_dim a scalar loop. Items run in parallel (OpenMP, the same libgomp as
 * torch's, so torch.set_num_threads governs both).
 *
 * Returns 0, or a negative code: -1 a block id outside [0, num_blocks) was read, -2 out of memory,
 * -3 a visible range outside [0, M * bs) (M = the block tables' width).
 * Built and loaded by cpu.py; this file has no Python or torch dependency.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TQ 16 /* queries of one sequence per tile (prefill); decode tiles hold one */

typedef struct {
    const void *q;
    int64_t q_sn, q_sh;                     /* q (N, H, D), unit stride on D */
    const void *k;
    int64_t k_sb, k_sh, k_st;               /* k (num_blocks, Hkv, bs, D), unit stride on D */
    const void *v;
    int64_t v_sb, v_sh, v_st;
    const int32_t *tables;                  /* (S, M) block ids */
    int64_t t_ss, M;
    const int64_t *cu;                      /* (S + 1,) query row offsets, or NULL: one query per sequence */
    const int64_t *starts, *ends;           /* (S,) visible slots [start, end) of each sequence */
    void *out;
    int64_t o_sn, o_sh;                     /* out (N, H, D), unit stride on D */
    int64_t S, H, Hkv, D, bs, num_blocks;
    float scale;
    int32_t bf16;                           /* 0: float32 everywhere, 1: bfloat16 q/k/v/out */
    int32_t n_threads;
} args_t;

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* exp(x) for x <= ~88, branch-free so loops over it vectorize (libm's expf does not without
 * -ffast-math, whose finite-math assumption the -inf of masked scores forbids). Cephes' expf:
 * x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n by exponent bits; about
 * 2 ulp. Below -87.3 (exp underflows to subnormals) it returns 0; -inf gives 0, NaN stays NaN. */
static inline float exp_vec(float x) {
    const float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    const float n = __builtin_rintf(xc * 1.44269504088896341f);
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    int32_t e = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &e, 4);
    const float y = p * two_n;
    return x != x ? x : (x < -87.3f ? 0.f : y);
}

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Rows of one bs x D block (row stride st, in elements) as contiguous float. */
static void widen(float *restrict dst, const void *src, int64_t st, int64_t rows, int64_t D, int bf16) {
    for (int64_t t = 0; t < rows; t++) {
        if (bf16) {
            const uint16_t *s = (const uint16_t *)src + t * st;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) dst[t * D + d] = bf16_to_f32(s[d]);
        } else {
            memcpy(dst + t * D, (const float *)src + t * st, (size_t)D * sizeof(float));
        }
    }
}

/* Online softmax over one block for one query row: scores of the visible slots [ta, te) of K
 * (rows of D floats), then the running max m, sum l and output accumulator acc are updated. */
static inline __attribute__((always_inline)) void finish_block(float *restrict sr, int64_t ta, int64_t te, float mx,
                                                               float *m, float *l, float *alpha_out) {
    if (mx == -INFINITY) mx = 0.f;                                        /* all scores -inf: keep finite */
    const float m_new = mx > *m ? mx : *m;
    const float alpha = exp_vec(*m - m_new);                              /* m = -inf at first: 0 */
    float lsum = 0.f;
#pragma omp simd reduction(+ : lsum)
    for (int64_t t = ta; t < te; t++) {
        sr[t] = exp_vec(sr[t] - m_new);
        lsum += sr[t];
    }
    *l = *l * alpha + lsum;
    *m = m_new;
    *alpha_out = alpha;
}

static inline __attribute__((always_inline)) void row_block(const float *restrict q, const float *restrict K,
                                                            const float *restrict V, int64_t ta, int64_t te,
                                                            float *restrict sr, float *m, float *l,
                                                            float *restrict acc, int64_t D) {
    float mx = -INFINITY, alpha;
    for (int64_t t = ta; t < te; t++) {
        sr[t] = dot(q, K + t * D, D);
        mx = sr[t] > mx ? sr[t] : mx;
    }
    finish_block(sr, ta, te, mx, m, l, &alpha);
#pragma omp simd
    for (int64_t d = 0; d < D; d++) acc[d] *= alpha;
    for (int64_t t = ta; t < te; t++) {
        const float p = sr[t], *vt = V + t * D;
#pragma omp simd
        for (int64_t d = 0; d < D; d++) acc[d] += p * vt[d];
    }
}

/* The same with GCC/Clang vector types, D a multiple of VL floats (<= 256): queries and
 * accumulators live in vector registers across the block, and K/V rows are read straight from
 * the pool (bf16 widened in registers: zero-extend to 32 bits, shift into the high half). */
#if defined(__AVX512F__)
#define VL 16                                 /* floats per vector: one zmm register */
#define NREG 32
#else
#define VL 8                                  /* AVX2's ymm; two xmm on SSE or NEON */
#define NREG 16
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4), may_alias));   /* unaligned access */
typedef uint32_t vu32 __attribute__((vector_size(VL * 4)));
typedef uint16_t vu16u __attribute__((vector_size(VL * 2), aligned(2), may_alias));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

static inline __attribute__((always_inline)) vf ldv(const void *p, int64_t i, int bf) {
    if (bf) return (vf)(__builtin_convertvector(*(const vu16u *)((const uint16_t *)p + i), vu32) << 16);
    return *(const vfu *)((const float *)p + i);
}

static inline float hsum(vf v) {
#if VL == 16
    vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    vf8 a = v;
#endif
    vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* RB rows at once (query heads of one KV head that see the same slots): each K and V row is
 * loaded once for all of them; their queries and accumulators stay in RB * D / VL registers.
 * K, V: rows of D elements (float, or bf16 when bf). */
static inline __attribute__((always_inline)) void rows_block_v(const float *restrict q, const void *K, const void *V,
                                                               int64_t ta, int64_t te, float *restrict sr, int64_t bs,
                                                               float *m, float *l, float *restrict acc, int64_t D,
                                                               int RB, int bf) {
    const int64_t C = D / VL;
    vf qv[4][256 / VL], av[4][256 / VL];
    float mx[4], alpha[4];
    for (int g = 0; g < RB; g++) {
        for (int64_t c = 0; c < C; c++) qv[g][c] = *(const vfu *)(q + g * D + c * VL);
        mx[g] = -INFINITY;
    }
    for (int64_t t = ta; t < te; t++) {
        vf s[4];
        const vf k0 = ldv(K, t * D, bf);
        for (int g = 0; g < RB; g++) s[g] = qv[g][0] * k0;
        for (int64_t c = 1; c < C; c++) {
            const vf kc = ldv(K, t * D + c * VL, bf);
            for (int g = 0; g < RB; g++) s[g] += qv[g][c] * kc;
        }
        for (int g = 0; g < RB; g++) {
            const float x = hsum(s[g]);
            sr[g * bs + t] = x;
            mx[g] = x > mx[g] ? x : mx[g];
        }
    }
    for (int g = 0; g < RB; g++) {
        finish_block(sr + g * bs, ta, te, mx[g], m + g, l + g, alpha + g);
        for (int64_t c = 0; c < C; c++) av[g][c] = *(const vfu *)(acc + g * D + c * VL) * alpha[g];
    }
    for (int64_t t = ta; t < te; t++)
        for (int64_t c = 0; c < C; c++) {
            const vf vc = ldv(V, t * D + c * VL, bf);
            for (int g = 0; g < RB; g++) av[g][c] += sr[g * bs + t] * vc;
        }
    for (int g = 0; g < RB; g++)
        for (int64_t c = 0; c < C; c++) *(vfu *)(acc + g * D + c * VL) = av[g][c];
}

/* The G heads of one query through rows_block_v, in groups that fit the registers. */
static inline __attribute__((always_inline)) void heads_block_v(const float *q, const void *K, const void *V,
                                                                int64_t ta, int64_t te, float *sr, int64_t bs,
                                                                float *m, float *l, float *acc, int64_t D, int64_t G,
                                                                int bf) {
    /* rows per pass: RB queries + one K row of D / VL vectors each must fit the registers */
    const int64_t fit = (NREG - D / VL) / (D / VL);
    const int RB = fit >= 4 ? 4 : fit >= 3 ? 3 : fit >= 2 ? 2 : 1;
    int64_t g = 0;
#define ROWS(n) rows_block_v(q + g * D, K, V, ta, te, sr + g * bs, bs, m + g, l + g, acc + g * D, D, n, bf)
    for (; g + RB <= G; g += RB) ROWS(RB);
    switch (G - g) {  /* the rest, fewer than RB */
    case 3: ROWS(3); break;
    case 2: ROWS(2); break;
    case 1: ROWS(1); break;
    }
#undef ROWS
}

/* One query's G heads over one block: the vector path for its (constant where common) D and
 * element type, else the scalar loop (K, V then float rows). */
static void query_block(const float *q, const void *K, const void *V, int64_t ta, int64_t te, float *sr, int64_t bs,
                        float *m, float *l, float *acc, int64_t D, int64_t G, int bf) {
    if (D % VL || D > 256) {
        for (int64_t g = 0; g < G; g++)
            row_block(q + g * D, (const float *)K, (const float *)V, ta, te, sr + g * bs, m + g, l + g, acc + g * D, D);
    } else if (bf) {
        if (D == 32) heads_block_v(q, K, V, ta, te, sr, bs, m, l, acc, 32, G, 1);
        else if (D == 64) heads_block_v(q, K, V, ta, te, sr, bs, m, l, acc, 64, G, 1);
        else if (D == 128) heads_block_v(q, K, V, ta, te, sr, bs, m, l, acc, 128, G, 1);
        else heads_block_v(q, K, V, ta, te, sr, bs, m, l, acc, D, G, 1);
    } else {
        if (D == 32) heads_block_v(q, K, V, ta, te, sr, bs, m, l, acc, 32, G, 0);
        else if (D == 64) heads_block_v(q, K, V, ta, te, sr, bs, m, l, acc, 64, G, 0);
        else if (D == 128) heads_block_v(q, K, V, ta, te, sr, bs, m, l, acc, 128, G, 0);
        else heads_block_v(q, K, V, ta, te, sr, bs, m, l, acc, D, G, 0);
    }
}

typedef struct { int64_t s, q0, nq; } tile_t;

/* Prefetch one block's K and V rows of heads [h0, h1): blocks are scattered through the pool,
 * so the hardware prefetchers (which stop at 4 KB pages) cannot see the next one coming. */
static inline void prefetch_block(const args_t *a, int64_t page, int64_t h0, int64_t h1, size_t esz) {
    const size_t row = (size_t)a->D * esz;
    for (int64_t h = h0; h < h1; h++) {
        const char *kn = (const char *)a->k + (size_t)(page * a->k_sb + h * a->k_sh) * esz;
        const char *vn = (const char *)a->v + (size_t)(page * a->v_sb + h * a->v_sh) * esz;
        for (int64_t t = 0; t < a->bs; t++)
            for (size_t o = 0; o < row; o += 64) {
                __builtin_prefetch(kn + (size_t)(t * a->k_st) * esz + o);
                __builtin_prefetch(vn + (size_t)(t * a->v_st) * esz + o);
            }
    }
}

/* One work item: queries [q0, q0 + nq) of sequence s, kv heads [h0, h1). Blocks are the outer
 * loop and heads the inner one, so each block's K (and V) rows of all heads -- one contiguous run
 * in the pool -- are read together, once. Scratch: see item_scratch(). */
static int run_item(const args_t *a, tile_t tl, int64_t h0, int64_t h1, float *scratch) {
    const int64_t D = a->D, bs = a->bs, G = a->H / a->Hkv, R = tl.nq * G * (h1 - h0);
    float *qs = scratch;                    /* (heads, nq, G, D) scaled queries */
    float *acc = qs + R * D;                /* (heads, nq, G, D) */
    float *m = acc + R * D;                 /* (heads, nq, G) running max */
    float *l = m + R;                       /* (heads, nq, G) running sum */
    float *sc = l + R;                      /* (nq, G, bs) scores of this block, one head at a time */
    float *kb = sc + tl.nq * G * bs;        /* (bs, D) widened K block (bf16 or strided) */
    float *vb = kb + bs * D;                /* (bs, D) */
    const int64_t s = tl.s;
    const int64_t n_s = a->cu ? a->cu[s + 1] - a->cu[s] : 1;
    const int64_t row0 = a->cu ? a->cu[s] : s;
    const int64_t start = a->starts[s], end = a->ends[s];
    int64_t hi[TQ];                         /* query i of the tile sees slots [start, hi[i]) */
    for (int64_t i = 0; i < tl.nq; i++) hi[i] = end - n_s + (tl.q0 + i) + 1;
    for (int64_t h = h0; h < h1; h++)
        for (int64_t i = 0; i < tl.nq; i++)
            for (int64_t g = 0; g < G; g++) {
                const int64_t r = ((h - h0) * tl.nq + i) * G + g, n = row0 + tl.q0 + i, hq = h * G + g;
                if (a->bf16) {
                    const uint16_t *src = (const uint16_t *)a->q + n * a->q_sn + hq * a->q_sh;
                    for (int64_t d = 0; d < D; d++) qs[r * D + d] = bf16_to_f32(src[d]) * a->scale;
                } else {
                    const float *src = (const float *)a->q + n * a->q_sn + hq * a->q_sh;
                    for (int64_t d = 0; d < D; d++) qs[r * D + d] = src[d] * a->scale;
                }
                m[r] = -INFINITY;
                l[r] = 0.f;
                memset(acc + r * D, 0, (size_t)D * sizeof(float));
            }
    if (start < 0 || hi[tl.nq - 1] > a->M * bs) return -3;
    const int64_t first = start / bs;
    const int64_t last = (hi[tl.nq - 1] + bs - 1) / bs;   /* exclusive; the tile's last query sees most */
    /* K/V rows read in place when unit-strided along the block and the vector path takes D;
     * else each block's visible rows are first widened into contiguous float scratch */
    const int direct = a->k_st == D && a->v_st == D && D % VL == 0 && D <= 256;
    const size_t esz = a->bf16 ? 2 : 4;
    for (int64_t j = first; j < last; j++) {
        const int64_t page = a->tables[s * a->t_ss + j];
        if (page < 0 || page >= a->num_blocks) return -1;
        if (j + 1 < last) {
            const int64_t nxt = a->tables[s * a->t_ss + j + 1];
            if (nxt >= 0 && nxt < a->num_blocks) prefetch_block(a, nxt, h0, h1, esz);
        }
        const int64_t t0 = j * bs;
        const int64_t ta = t0 > start ? 0 : start - t0;                   /* first visible slot in block */
        int64_t tb = hi[tl.nq - 1] - t0;                                  /* end of visible slots in block */
        if (tb > bs) tb = bs;
        for (int64_t h = h0; h < h1; h++) {
            const char *kp = (const char *)a->k + (size_t)(page * a->k_sb + h * a->k_sh) * esz;
            const char *vp = (const char *)a->v + (size_t)(page * a->v_sb + h * a->v_sh) * esz;
            const void *K = kp, *V = vp;
            int bf = a->bf16;
            if (!direct) {
                widen(kb + ta * D, kp + (size_t)(ta * a->k_st) * esz, a->k_st, tb - ta, D, a->bf16);
                widen(vb + ta * D, vp + (size_t)(ta * a->v_st) * esz, a->v_st, tb - ta, D, a->bf16);
                K = kb;
                V = vb;
                bf = 0;
            }
            for (int64_t i = 0; i < tl.nq; i++) {
                int64_t te = hi[i] - t0;                                  /* this query's end in block */
                if (te > bs) te = bs;
                if (te <= ta) continue;                                   /* nothing visible here */
                const int64_t r = ((h - h0) * tl.nq + i) * G;             /* the query's G heads */
                query_block(qs + r * D, K, V, ta, te, sc + i * G * bs, bs, m + r, l + r, acc + r * D, D, G, bf);
            }
        }
    }
    for (int64_t h = h0; h < h1; h++)
        for (int64_t i = 0; i < tl.nq; i++)
            for (int64_t g = 0; g < G; g++) {
                const int64_t r = ((h - h0) * tl.nq + i) * G + g, n = row0 + tl.q0 + i, hq = h * G + g;
                const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;          /* an empty range reads nothing: 0 */
                if (a->bf16) {
                    uint16_t *dst = (uint16_t *)a->out + n * a->o_sn + hq * a->o_sh;
                    for (int64_t d = 0; d < D; d++) dst[d] = f32_to_bf16(acc[r * D + d] * inv);
                } else {
                    float *dst = (float *)a->out + n * a->o_sn + hq * a->o_sh;
                    for (int64_t d = 0; d < D; d++) dst[d] = acc[r * D + d] * inv;
                }
            }
    return 0;
}

static size_t item_scratch(const args_t *a, int64_t heads) {
    const int64_t R = TQ * (a->H / a->Hkv);
    return (size_t)(heads * (2 * R * a->D + 2 * R) + R * a->bs + 2 * a->bs * a->D) * sizeof(float);
}

int memstack_paged_attention(const args_t *a) {
    /* tiles: decode (cu NULL) has one query per sequence; otherwise split each sequence in TQ runs */
    int64_t n_tiles = 0;
    for (int64_t s = 0; s < a->S; s++) {
        const int64_t n_s = a->cu ? a->cu[s + 1] - a->cu[s] : 1;
        n_tiles += (n_s + TQ - 1) / TQ;
    }
    if (n_tiles == 0) return 0;
    tile_t one[1];
    tile_t *tiles = n_tiles == 1 ? one : malloc((size_t)n_tiles * sizeof(tile_t));
    if (!tiles) return -2;
    int64_t t = 0;
    for (int64_t s = 0; s < a->S; s++) {
        const int64_t n_s = a->cu ? a->cu[s + 1] - a->cu[s] : 1;
        for (int64_t q0 = 0; q0 < n_s; q0 += TQ) {
            tiles[t].s = s;
            tiles[t].q0 = q0;
            tiles[t].nq = n_s - q0 < TQ ? n_s - q0 : TQ;
            t++;
        }
    }
    /* an item is a tile with all its heads; with fewer tiles than threads, heads are split too */
    int64_t groups = 1;
    if (a->n_threads > 1 && n_tiles < a->n_threads) {
        groups = (a->n_threads + n_tiles - 1) / n_tiles;
        if (groups > a->Hkv) groups = a->Hkv;
    }
    const int64_t items = n_tiles * groups, per = (a->Hkv + groups - 1) / groups;
    const size_t scratch = item_scratch(a, per);
    int err = 0;
    int nt = a->n_threads > 1 && items > 1 ? a->n_threads : 1;
    if (nt > items) nt = (int)items;
    if (nt == 1) {  /* no parallel region at all: even an inactive one costs libgomp a futex wake */
        float *buf = malloc(scratch);
        if (!buf) err = -2;
        for (int64_t it = 0; buf && it < items && !err; it++) {
            const int64_t h0 = (it % groups) * per, h1 = h0 + per < a->Hkv ? h0 + per : a->Hkv;
            err = h0 < h1 ? run_item(a, tiles[it / groups], h0, h1, buf) : 0;
        }
        free(buf);
        if (tiles != one) free(tiles);
        return err;
    }
#pragma omp parallel num_threads(nt)
    {
        float *buf = malloc(scratch);
        if (!buf) {
#pragma omp atomic write
            err = -2;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!buf) continue;
            const int64_t h0 = (it % groups) * per, h1 = h0 + per < a->Hkv ? h0 + per : a->Hkv;
            const int rc = h0 < h1 ? run_item(a, tiles[it / groups], h0, h1, buf) : 0;
            if (rc) {
#pragma omp atomic write
                err = rc;
            }
        }
        free(buf);
    }
    if (tiles != one) free(tiles);
    return err;
}
