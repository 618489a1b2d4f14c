/* Vector helpers shared by the CPU kernels: GCC vector extensions, so the compiler emits AVX-512, AVX2
 * or NEON for the machine it builds on (-march=native). */
#ifndef LLMSERVE_CPU_VEC_H
#define LLMSERVE_CPU_VEC_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#define LANES 16

/* The widest vector the target has registers for. A 16-float `vec` is one AVX-512 register; without AVX-512
 * GCC keeps such a vector in memory and runs each operation on it through loads and stores (it has no machine
 * mode for it), which is harmless where memory bandwidth bounds a loop but ruinous in a GEMM's register tile:
 * compute-bound code works on `rvec`, RPARTS of which make one `vec`. */
#if defined(__AVX512F__)
#define RLANES 16
#elif defined(__AVX__)
#define RLANES 8
#else
#define RLANES 4
#endif
#define RPARTS (LANES / RLANES)
typedef float rvec __attribute__((vector_size(RLANES * sizeof(float))));
typedef int rivec __attribute__((vector_size(RLANES * sizeof(int))));
static inline rvec rload(const float *p) { rvec v; memcpy(&v, p, sizeof v); return v; }
static inline void rstore(float *p, rvec v) { memcpy(p, &v, sizeof v); }
static inline rvec rsplat(float x) { return (rvec){0} + x; }

/* How many `rvec` accumulators a register tile may keep: three quarters of the registers (AVX-512 and NEON have
 * 32, AVX2 16), the rest holding the weights and the broadcast input. */
#if defined(__AVX512F__) || !defined(__AVX__)
#define REG_ACCS 24
#else
#define REG_ACCS 12
#endif
/* 16-float accumulators per row for `rows` rows in a register tile: between 1 and `most`. */
#define REG_ACCS_PER_ROW(rows, most) ((REG_ACCS / (RPARTS * (rows))) < 1 ? 1                          \
                                      : (REG_ACCS / (RPARTS * (rows))) > (most) ? (most)              \
                                      : (REG_ACCS / (RPARTS * (rows))))

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef int ivec __attribute__((vector_size(LANES * sizeof(int))));
typedef float vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vec4 __attribute__((vector_size(4 * sizeof(float))));

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }   /* unaligned */
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }
static inline vec splat(float x) { return (vec){0} + x; }

#if defined(__clang__) || __GNUC__ >= 12
#define HAVE_SHUFFLEVECTOR 1
#endif

/* Sum of the 16 lanes as a tree of halvings. */
static inline float hsum(vec v) {
#ifdef HAVE_SHUFFLEVECTOR
    vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
           + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[1]) + (b[2] + b[3]);
#else
    float s[LANES];
    memcpy(s, &v, sizeof s);
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int i = 0; i < width; i++) s[i] += s[i + width];
    return s[0];
#endif
}

#ifdef HAVE_SHUFFLEVECTOR
/* The lane sums of four vectors at once: halving all four together takes a quarter of the shuffles of four
 * separate hsum trees. */
static inline vec4 hsum4(vec a, vec b, vec c, vec d) {
    const vec ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
                 + __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const vec cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
                 + __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const vec quarters = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
                       + __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    const vec8 pairs = __builtin_shufflevector(quarters, quarters, 0, 1, 4, 5, 8, 9, 12, 13)
                     + __builtin_shufflevector(quarters, quarters, 2, 3, 6, 7, 10, 11, 14, 15);
    return __builtin_shufflevector(pairs, pairs, 0, 2, 4, 6) + __builtin_shufflevector(pairs, pairs, 1, 3, 5, 7);
}
#endif

typedef int ivec8 __attribute__((vector_size(8 * sizeof(int))));
typedef int ivec4 __attribute__((vector_size(4 * sizeof(int))));

/* Whether any lane of a comparison mask is set. */
static inline int any_lane(ivec m) {
#ifdef HAVE_SHUFFLEVECTOR
    ivec8 a = __builtin_shufflevector(m, m, 0, 1, 2, 3, 4, 5, 6, 7) | __builtin_shufflevector(m, m, 8, 9, 10, 11, 12, 13, 14, 15);
    ivec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) | __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] | b[1] | b[2] | b[3]) != 0;
#else
    int s[LANES];
    memcpy(s, &m, sizeof s);
    int any = 0;
    for (int i = 0; i < LANES; i++) any |= s[i];
    return any != 0;
#endif
}

/* Lane-wise `mask ? a : b` for a mask from a vector comparison. */
static inline vec vselect(ivec mask, vec a, vec b) { return (vec)(((ivec)a & mask) | ((ivec)b & ~mask)); }

static inline vec vmax(vec a, vec b) { return vselect(a > b, a, b); }
static inline rvec rselect(rivec mask, rvec a, rvec b) { return (rvec)(((rivec)a & mask) | ((rivec)b & ~mask)); }
static inline rvec rmax(rvec a, rvec b) { return rselect(a > b, a, b); }

/* exp(x) for x <= 0, relative error ~2e-7: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for
 * exp(r), and 2^n put into the exponent bits. Below -87 the result is flushed towards 0 (exp(-87) ~
 * 1.6e-38: nothing next to the other terms it is added to). Defined for `vec` (vexp_nonpositive) and for
 * the register-width `rvec` (rexp_nonpositive), lane for lane the same values. */
#define DEFINE_EXP_NONPOSITIVE(NAME, V, IV, MAX, SPLAT)                                                       \
    static inline V NAME(V x) {                                                                              \
        x = MAX(x, SPLAT(-87.0f));                                                                           \
        const V shifter = SPLAT(12582912.0f);   /* 1.5 * 2^23: adding it rounds to an integer */             \
        V n = (x * SPLAT(1.44269504f) + shifter) - shifter;                                                  \
        V r = x - n * SPLAT(0.693145752f) - n * SPLAT(1.42860677e-06f);                                      \
        V p = SPLAT(1.0f / 720);                                                                             \
        p = p * r + SPLAT(1.0f / 120);                                                                       \
        p = p * r + SPLAT(1.0f / 24);                                                                        \
        p = p * r + SPLAT(1.0f / 6);                                                                         \
        p = p * r + SPLAT(0.5f);                                                                             \
        p = p * r + SPLAT(1.0f);                                                                             \
        p = p * r + SPLAT(1.0f);                                                                             \
        IV bits = (__builtin_convertvector(n, IV) + 127) << 23;                                              \
        return p * (V)bits;                                                                                  \
    }
DEFINE_EXP_NONPOSITIVE(vexp_nonpositive, vec, ivec, vmax, splat)
DEFINE_EXP_NONPOSITIVE(rexp_nonpositive, rvec, rivec, rmax, rsplat)
#undef DEFINE_EXP_NONPOSITIVE

/* Sum of an rvec's lanes (hsum's tree where rvec is a whole vec). */
static inline float rhsum(rvec v) {
#if RLANES == LANES
    vec w;
    memcpy(&w, &v, sizeof w);
    return hsum(w);
#else
    float s[RLANES];
    memcpy(s, &v, sizeof s);
    for (int width = RLANES / 2; width > 0; width /= 2)
        for (int i = 0; i < width; i++) s[i] += s[i + width];
    return s[0];
#endif
}

/* The lane sums of RLANES vectors at once: lane i of the result is the sum of v[i]'s lanes. Pairs are summed
 * even lane with odd lane into one vector holding both halves, level by level (RLANES - 1 pairs of two-source
 * shuffles in all), instead of a separate reduction tree ending in scalar adds per vector. Overwrites v. */
static inline rvec rhsum_each(rvec *v) {
#ifdef HAVE_SHUFFLEVECTOR
#if RLANES == 16
#define EVENS(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
#define ODDS(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)
#elif RLANES == 8
#define EVENS(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14)
#define ODDS(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15)
#else
#define EVENS(a, b) __builtin_shufflevector(a, b, 0, 2, 4, 6)
#define ODDS(a, b) __builtin_shufflevector(a, b, 1, 3, 5, 7)
#endif
#pragma GCC unroll 8
    for (int n = RLANES; n > 1; n /= 2)
#pragma GCC unroll 8
        for (int i = 0; i < n / 2; i++) v[i] = EVENS(v[2 * i], v[2 * i + 1]) + ODDS(v[2 * i], v[2 * i + 1]);
#undef EVENS
#undef ODDS
    return v[0];
#else
    rvec r;
    for (int i = 0; i < RLANES; i++) r[i] = rhsum(v[i]);
    return r;
#endif
}

/* Whether any lane of an rvec comparison mask is set. */
static inline int rany_lane(rivec m) {
    int s[RLANES], any = 0;
    memcpy(s, &m, sizeof s);
    for (int i = 0; i < RLANES; i++) any |= s[i];
    return any != 0;
}

/* bfloat16 (the high half of a float32): widened in registers, rounded back on store. */
typedef uint16_t u16vec __attribute__((vector_size(LANES * sizeof(uint16_t))));

/* 16 bfloat16 values as floats. */
static inline vec load_bf16(const uint16_t *p) {
#ifdef __AVX512F__
    /* one widening load: GCC splits the generic conversion below into two 256-bit halves and an insert */
    return (vec)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#else
    u16vec h;
    memcpy(&h, p, sizeof h);
    return (vec)(__builtin_convertvector(h, ivec) << 16);
#endif
}

static inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The bfloat16 bits (low half of each lane) of float lanes: nearest, ties to even; a NaN stays a (quiet) NaN.
 * Defined for `vec` (bf16_bits) and `rvec` (rbf16_bits). */
typedef uint32_t uvec __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint32_t ruvec __attribute__((vector_size(RLANES * sizeof(uint32_t))));
#define DEFINE_BF16_BITS(NAME, V, UV)                                                                        \
    static inline UV NAME(V v) {                                                                             \
        const UV bits = (UV)v;                                                                               \
        const UV rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;                                       \
        const UV nan = (UV)(v != v);                                                                         \
        return (nan & ((bits >> 16) | 0x40)) | (~nan & rounded);                                             \
    }
DEFINE_BF16_BITS(bf16_bits, vec, uvec)
DEFINE_BF16_BITS(rbf16_bits, rvec, ruvec)
#undef DEFINE_BF16_BITS

/* Round 16 floats to bfloat16 (nearest, ties to even; NaN stays NaN) and store them. */
static inline void store_bf16(uint16_t *p, vec v) {
#ifdef __AVX512BF16__
    const __m256bh h = _mm512_cvtneps_pbh((__m512)v);
    memcpy(p, &h, sizeof h);
#else
    const u16vec h = __builtin_convertvector(bf16_bits(v), u16vec);
    memcpy(p, &h, sizeof h);
#endif
}

/* Floats rounded to the nearest bfloat16 value, kept as floats: where a bfloat16 model rounds a result. */
static inline vec round_bf16(vec v) {
    uint16_t h[LANES];
    store_bf16(h, v);
    return load_bf16(h);
}

/* Activations that are float32 or bfloat16 (`bf16`, a constant in each specialised caller): loaded as floats,
 * stored rounded to the activation's type. */
static inline __attribute__((always_inline)) vec load_act(const void *p, long i, const int bf16) {
    return bf16 ? load_bf16((const uint16_t *)p + i) : load((const float *)p + i);
}

static inline __attribute__((always_inline)) float load_act1(const void *p, long i, const int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline __attribute__((always_inline)) void store_act(void *p, long i, vec v, const int bf16) {
    if (bf16) store_bf16((uint16_t *)p + i, v);
    else store((float *)p + i, v);
}

static inline __attribute__((always_inline)) void store_act1(void *p, long i, float v, const int bf16) {
    if (bf16) {
        uint16_t h[LANES];
        store_bf16(h, splat(v));
        ((uint16_t *)p)[i] = h[0];
    } else {
        ((float *)p)[i] = v;
    }
}

/* load_act / store_act at register width (RLANES values): loops on them keep their vectors in registers on
 * targets without AVX-512, where a 16-float vec lives on the stack. Where rvec is vec they are the same. */
#if RLANES == LANES
static inline __attribute__((always_inline)) rvec rload_act(const void *p, long i, const int bf16) {
    const vec v = load_act(p, i, bf16);
    rvec r;
    memcpy(&r, &v, sizeof r);
    return r;
}

static inline __attribute__((always_inline)) void rstore_act(void *p, long i, rvec v, const int bf16) {
    vec w;
    memcpy(&w, &v, sizeof w);
    store_act(p, i, w, bf16);
}
#else
typedef uint16_t ru16vec __attribute__((vector_size(RLANES * sizeof(uint16_t))));

static inline __attribute__((always_inline)) rvec rload_act(const void *p, long i, const int bf16) {
    if (!bf16) return rload((const float *)p + i);
    ru16vec h;
    memcpy(&h, (const uint16_t *)p + i, sizeof h);
    return (rvec)(__builtin_convertvector(h, rivec) << 16);
}

static inline __attribute__((always_inline)) void rstore_act(void *p, long i, rvec v, const int bf16) {
    if (!bf16) {
        rstore((float *)p + i, v);
        return;
    }
    const ru16vec h = __builtin_convertvector(rbf16_bits(v), ru16vec);
    memcpy((uint16_t *)p + i, &h, sizeof h);
}
#endif

/* Register-width floats rounded to the nearest bfloat16 value, kept as floats. */
static inline __attribute__((always_inline)) rvec rround_bf16(rvec v) {
    uint16_t h[RLANES];
    rstore_act(h, 0, v, 1);
    return rload_act(h, 0, 1);
}

#endif
