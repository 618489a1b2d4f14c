/* The AVX-512 VNNI paths of the group-int8 kernel; included by cpu_group_int8_linear.c after its shared
 * definitions (gi8_tile, GI8_TILE, GI8_ROWS, group_xsum), never on its own.
 *
 * One 64-byte load of a tile's codes feeds 16 rows x 4 columns of vpdpbusd (u8 codes x s8 activations, four
 * products summed per int32 lane). Up to GI8_ROWS activation rows (decode), each thread takes whole tiles and
 * multiplies a tile by every row at once (a register tile: each loaded weight vector serves every row), so the
 * weight is streamed once. With more rows (prefill, or decode at many concurrent sequences) threads take pairs of
 * tiles and multiply them by GI8_GEMM_ROWS rows at a time: each activation broadcast serves both tiles, each
 * unpacked weight vector every row, and each row's scale and sum are loaded once per group for both tiles, so
 * fewer instructions surround each vpdpbusd. */
#ifndef LLMSERVE_CPU_GROUP_INT8_VNNI_H
#define LLMSERVE_CPU_GROUP_INT8_VNNI_H

#define GI8_GEMM_ROWS 6  /* activation rows per register tile of the many-row path */
#define GI8_GEMM_TILES 2 /* weight tiles per register tile of the many-row path */
static inline __m512i bcast4(const signed char *p) { int v; memcpy(&v, p, 4); return _mm512_set1_epi32(v); }

/* Step s (0-3) of a chunk of 6-bit codes: the low (s even) or high nibbles of `nibbles` ORed with bits 2 s,
 * 2 s + 1 of each `plane` byte moved to bits 4-5 (16-bit shifts: what crosses a byte is masked off). */
static inline __m512i six_bit_step(__m512i nibbles, __m512i plane, const int s) {
    const __m512i low = _mm512_and_si512(s & 1 ? _mm512_srli_epi16(nibbles, 4) : nibbles, _mm512_set1_epi8(0x0f));
    const __m512i top = s == 0 ? _mm512_slli_epi16(plane, 4) : s == 1 ? _mm512_slli_epi16(plane, 2)
                                                             : s == 2 ? plane : _mm512_srli_epi16(plane, 2);
    return _mm512_ternarylogic_epi32(low, top, _mm512_set1_epi8(0x30), 0xf8);   /* low | (top & 0x30) */
}

/* The codes of columns c..c+3 (*w) and c+4..c+7 (*w2) of a tile, c a multiple of 8, as bytes. */
static inline __attribute__((always_inline)) void
step_pair(const unsigned char *codes, long c, const int bits, __m512i *w, __m512i *w2) {
    if (bits == 8) {
        *w = _mm512_loadu_si512((const void *)(codes + c * GI8_TILE));
        *w2 = _mm512_loadu_si512((const void *)(codes + (c + 4) * GI8_TILE));
    } else if (bits == 4) {
        const __m512i packed = _mm512_loadu_si512((const void *)(codes + c * GI8_TILE / 2));
        *w = _mm512_and_si512(packed, _mm512_set1_epi8(0x0f));
        *w2 = _mm512_and_si512(_mm512_srli_epi16(packed, 4), _mm512_set1_epi8(0x0f));
    } else {
        const __m512i nibbles = _mm512_loadu_si512((const void *)(codes + six_bit_nibbles(c)));
        const __m512i plane = _mm512_loadu_si512((const void *)(codes + six_bit_plane(c)));
        const int s = (c & 8) ? 2 : 0;
        *w = six_bit_step(nibbles, plane, s);
        *w2 = six_bit_step(nibbles, plane, s + 1);
    }
}

/* Group g's scales and offsets of a tile's 16 rows, expanded to float32. */
static inline void group_scales(const gi8_tile *t, long g, __m512 *s, __m512 *o) {
    const long b = g >> t->block_shift;
    *s = _mm512_cvtph_ps(_mm256_loadu_si256((const void *)(t->d + b * GI8_TILE)));
    if (t->sc)
        *s = _mm512_mul_ps(*s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                   _mm_loadu_si128((const void *)(t->sc + g * GI8_TILE)))));
    if (t->m == NULL) {
        *o = _mm512_mul_ps(*s, _mm512_set1_ps(t->neg_zero));
        return;
    }
    *o = _mm512_cvtph_ps(_mm256_loadu_si256((const void *)(t->m + b * GI8_TILE)));
    if (t->mins)
        *o = _mm512_mul_ps(*o, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                   _mm_loadu_si128((const void *)(t->mins + g * GI8_TILE)))));
}

/* One tile of 16 output rows times mr activation rows; out[m * 16 + r]. */
static inline __attribute__((always_inline)) void
tile_dots(const gi8_tile *t, const signed char *xq, const float *xscale, const float *xsum, long k, float *out,
          const int mr, const int bits, const int group) {
    __m512 acc[GI8_ROWS];
    for (int m = 0; m < mr; m++) acc[m] = _mm512_setzero_ps();
    const long groups = k / group;
    for (long g = 0; g < groups; g++) {
        /* two independent sums per row (columns c..c+3 and c+4..c+7 of each step pair): vpdpbusd's latency
         * would otherwise bound a single row's chain */
        __m512i dot[GI8_ROWS], dot2[GI8_ROWS];
        for (int m = 0; m < mr; m++) dot[m] = dot2[m] = _mm512_setzero_si512();
        const long c0 = g * group;
        prefetch_codes(t->codes, c0, group, bits);
        for (long c = c0; c < c0 + group; c += 8) {
            __m512i w, w2;
            step_pair(t->codes, c, bits, &w, &w2);
            for (int m = 0; m < mr; m++) {
                dot[m] = _mm512_dpbusd_epi32(dot[m], w, bcast4(xq + m * k + c));
                dot2[m] = _mm512_dpbusd_epi32(dot2[m], w2, bcast4(xq + m * k + c + 4));
            }
        }
        for (int m = 0; m < mr; m++) dot[m] = _mm512_add_epi32(dot[m], dot2[m]);
        __m512 s, o;
        group_scales(t, g, &s, &o);
        for (int m = 0; m < mr; m++) {
            const __m512 sx = _mm512_mul_ps(s, _mm512_set1_ps(xscale[m * (k / GI8_XBLOCK) + c0 / GI8_XBLOCK]));
            acc[m] = _mm512_fmadd_ps(sx, _mm512_cvtepi32_ps(dot[m]), acc[m]);
            acc[m] = _mm512_fmadd_ps(o, _mm512_set1_ps(group_xsum(xsum + m * (k / GI8_XSUM), g, group)), acc[m]);
        }
    }
    for (int m = 0; m < mr; m++) _mm512_storeu_ps(out + m * GI8_TILE, acc[m]);
}

/* nt (1 or 2) tiles times mr (up to GI8_GEMM_ROWS) activation rows; one
 * dot-product chain per (row, tile), which with several rows and tiles is enough independent chains.
 * out[m * 16 * nt + t * 16 + r]. The float terms are tile_dots' in the same order. */
static inline __attribute__((always_inline)) void
panel_dots(const gi8_tile *tiles, const signed char *xq, const float *xscale, const float *xsum, long k, float *out,
           const int mr, const int nt, const int bits, const int group) {
    __m512 acc[GI8_GEMM_ROWS][GI8_GEMM_TILES];
    for (int m = 0; m < mr; m++)
        for (int t = 0; t < nt; t++) acc[m][t] = _mm512_setzero_ps();
    const long groups = k / group;
    for (long g = 0; g < groups; g++) {
        __m512i dot[GI8_GEMM_ROWS][GI8_GEMM_TILES];
        for (int m = 0; m < mr; m++)
            for (int t = 0; t < nt; t++) dot[m][t] = _mm512_setzero_si512();
        const long c0 = g * group;
        for (long c = c0; c < c0 + group; c += 8) {
            __m512i w[GI8_GEMM_TILES], w2[GI8_GEMM_TILES];
            for (int t = 0; t < nt; t++) step_pair(tiles[t].codes, c, bits, &w[t], &w2[t]);
            for (int m = 0; m < mr; m++) {
                const __m512i a = bcast4(xq + m * k + c), a2 = bcast4(xq + m * k + c + 4);
                for (int t = 0; t < nt; t++)
                    dot[m][t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot[m][t], w[t], a), w2[t], a2);
            }
        }
        __m512 s[GI8_GEMM_TILES], o[GI8_GEMM_TILES];
        for (int t = 0; t < nt; t++) group_scales(&tiles[t], g, &s[t], &o[t]);
        for (int m = 0; m < mr; m++) {
            const __m512 xs = _mm512_set1_ps(xscale[m * (k / GI8_XBLOCK) + c0 / GI8_XBLOCK]);
            const __m512 sum = _mm512_set1_ps(group_xsum(xsum + m * (k / GI8_XSUM), g, group));
            for (int t = 0; t < nt; t++) {
                acc[m][t] = _mm512_fmadd_ps(_mm512_mul_ps(s[t], xs), _mm512_cvtepi32_ps(dot[m][t]), acc[m][t]);
                acc[m][t] = _mm512_fmadd_ps(o[t], sum, acc[m][t]);
            }
        }
    }
    for (int m = 0; m < mr; m++)
        for (int t = 0; t < nt; t++) _mm512_storeu_ps(out + (m * nt + t) * GI8_TILE, acc[m][t]);
}

#define GI8_PANEL_CASE(MR, NT, BITS, GROUP)                                                                  \
    if (mr == MR && nt == NT && bits == BITS && group == GROUP) {                                             \
        panel_dots(pair, xq + m0 * k, xscale + m0 * (k / GI8_XBLOCK),          \
                   xsum + m0 * (k / GI8_XSUM), k, out, MR, NT, BITS, GROUP);                                  \
    } else
#define GI8_PANEL_FORMATS(MR, NT) GI8_PANEL_CASE(MR, NT, 8, 16) GI8_PANEL_CASE(MR, NT, 8, 32)              \
    GI8_PANEL_CASE(MR, NT, 6, 16) GI8_PANEL_CASE(MR, NT, 6, 32) GI8_PANEL_CASE(MR, NT, 4, 16)                \
    GI8_PANEL_CASE(MR, NT, 4, 32)
#define GI8_PANEL_CASES(MR) GI8_PANEL_FORMATS(MR, 1) GI8_PANEL_FORMATS(MR, 2)

/* The many-row path of llmserve_group_int8_linear: each thread takes pairs of tiles (the last one maybe
 * alone) and runs them over all M rows, GI8_GEMM_ROWS at a time. */
static void gemm_tiles(const signed char *xq, const float *xscale, const float *xsum, long M, long k,
                       const gi8_weight *wt, const float *bias, float *y, long y_stride, int num_threads) {
    const long n = wt->rows, tiles = (n + GI8_TILE - 1) / GI8_TILE;
    const long pairs = (tiles + GI8_GEMM_TILES - 1) / GI8_GEMM_TILES;
    const int bits = wt->bits, group = wt->group;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (long p = 0; p < pairs; p++) {
        const long t0 = p * GI8_GEMM_TILES;
        const int nt = tiles - t0 < GI8_GEMM_TILES ? (int)(tiles - t0) : GI8_GEMM_TILES;
        gi8_tile pair[GI8_GEMM_TILES];
        for (int t = 0; t < nt; t++) pair[t] = tile_at(wt, k, t0 + t);
        const long cols = n - t0 * GI8_TILE < nt * GI8_TILE ? n - t0 * GI8_TILE : nt * GI8_TILE;
        for (long m0 = 0; m0 < M; m0 += GI8_GEMM_ROWS) {
            const int mr = M - m0 < GI8_GEMM_ROWS ? (int)(M - m0) : GI8_GEMM_ROWS;
            float out[GI8_GEMM_ROWS * GI8_GEMM_TILES * GI8_TILE];
            GI8_PANEL_CASES(1) GI8_PANEL_CASES(2) GI8_PANEL_CASES(3) GI8_PANEL_CASES(4) GI8_PANEL_CASES(5)
            GI8_PANEL_CASES(6) {}
            for (int m = 0; m < mr; m++)
                for (long r = 0; r < cols; r++)
                    y[(m0 + m) * y_stride + t0 * GI8_TILE + r] = out[m * nt * GI8_TILE + r]
                                                                  + (bias ? bias[t0 * GI8_TILE + r] : 0.f);
        }
    }
}

#endif
