/* Vector helpers shared by the CPU kernels: GCC vector extensions, so the compiler emits AVX-512, AVX2
 * or NEON for the machine it builds on (-march=native). */
#ifndef LLMSERVE_CPU_VEC_H
#define LLMSERVE_CPU_VEC_H

#include <string.h>

#define LANES 16

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

/* exp(x) for x <= 0, relative error ~2e-7: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for
 * exp(r), and 2^n put into the exponent bits. Below -87 the result is flushed towards 0 (exp(-87) ~
 * 1.6e-38: nothing next to the other terms it is added to). */
static inline vec vexp_nonpositive(vec x) {
    x = vmax(x, splat(-87.0f));
    const vec shifter = splat(12582912.0f);   /* 1.5 * 2^23: adding it rounds to an integer */
    vec n = (x * splat(1.44269504f) + shifter) - shifter;
    vec r = x - n * splat(0.693145752f) - n * splat(1.42860677e-06f);
    vec p = splat(1.0f / 720);
    p = p * r + splat(1.0f / 120);
    p = p * r + splat(1.0f / 24);
    p = p * r + splat(1.0f / 6);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
    return p * (vec)bits;
}

#endif
