/* The AVX2 paths of the group-int8 kernel (CPUs without AVX-512 VNNI); included by cpu_group_int8_linear.c
 * after its shared definitions (gi8_tile, GI8_TILE, GI8_ROWS, group_xsum), never on its own.
 *
 * vpmaddubsw (u8 x s8, pairs summed to int16) takes 4-bit codes directly; an 8-bit code enters as its two
 * nibbles (code = 16 hi + lo), since two full 8-bit products can overflow the int16 pair sum. Nibble products
 * sum to at most 2 x 15 x 127 per lane and step, so a group of up to 32 columns is summed in int16 and widened
 * once (vpmaddwd) at its end. 6-bit codes (Q5_x, Q6_K), unpacked to bytes below 64, go in whole: a pair sum is
 * at most 2 x 63 x 127, so two steps add in int16 before one vpmaddwd widens them. A ymm register holds half a
 * tile (8 output rows x 4 columns), so both paths work on half-tiles.
 * Few rows (decode): a register tile of a half-tile times up to GI8_AVX2_ROWS rows. Many rows (4-bit codes
 * from GI8_AVX2_GEMM_ROWS4 rows, the others above GI8_ROWS): the codes of 32 columns of a half-tile stay in
 * registers while the rows stream past (half_tile_rows), which shares their unpacking with every row. There an
 * 8-bit code goes in whole as |code - 128| with the sign of code - 128 moved onto the activation (vpsignb; a pair
 * sum is then at most 2 x 128 x 127), and 128 times the activations' sum added back as an integer. */
#ifndef LLMSERVE_CPU_GROUP_INT8_AVX2_H
#define LLMSERVE_CPU_GROUP_INT8_AVX2_H

#define GI8_AVX2_ROWS 4        /* activation rows per register tile of a half-tile (16 ymm registers) */
#define GI8_AVX2_GEMM_ROWS4 4  /* rows from which 4-bit codes take the many-row path */
#define GI8_AVX2_CHUNK 64      /* activation rows per pass of the many-row path (their outputs stay in L1) */

static inline __m256i bcast4_256(const signed char *p) { int v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
static inline __m256 halves8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const void *)p)); }
static inline __m128i bytes8(const void *p) { return _mm_loadl_epi64((const void *)p); }

/* Step s (0-3) of a chunk of 6-bit codes, one half-tile: the low (s even) or high nibbles of `nibbles` ORed with
 * bits 2 s, 2 s + 1 of each `plane` byte moved to bits 4-5 (16-bit shifts: what crosses a byte is masked off). */
static inline __m256i six_bit_step(__m256i nibbles, __m256i plane, const int s) {
    const __m256i low = _mm256_and_si256(s & 1 ? _mm256_srli_epi16(nibbles, 4) : nibbles, _mm256_set1_epi8(0x0f));
    const __m256i top = s == 0 ? _mm256_slli_epi16(plane, 4) : s == 1 ? _mm256_slli_epi16(plane, 2)
                                                             : s == 2 ? plane : _mm256_srli_epi16(plane, 2);
    return _mm256_or_si256(low, _mm256_and_si256(top, _mm256_set1_epi8(0x30)));
}

/* The 6-bit codes of columns c..c+3 (*w) and c+4..c+7 (*w2) of rows 8 h .. 8 h + 7, c a multiple of 8, as bytes. */
static inline void six_bit_pair(const unsigned char *codes, long c, int h, __m256i *w, __m256i *w2) {
    const __m256i nibbles = _mm256_loadu_si256((const void *)(codes + six_bit_nibbles(c) + h * 32));
    const __m256i plane = _mm256_loadu_si256((const void *)(codes + six_bit_plane(c) + h * 32));
    const int s = (c & 8) ? 2 : 0;
    *w = six_bit_step(nibbles, plane, s);
    *w2 = six_bit_step(nibbles, plane, s + 1);
}

/* A chunk of quantised activation rows, span-major: span s (32 columns) of row m at q[(s * rows + m) * 32],
 * its scale at scale[s * rows + m], the sums of its weight groups (one or two) at sums[(s * rows + m) * groups]. */
typedef struct {
    const signed char *q;
    const float *scale, *sums;
    const int *sums128;   /* 128 times each group's integer sum of q (8-bit codes only; NULL otherwise) */
} gi8_spans;

/* Group g's scales and offsets of rows 8 h .. 8 h + 7 of a tile, expanded to float32. */
static inline void group_scales(const gi8_tile *t, long g, int h, __m256 *s, __m256 *o) {
    const long b = g >> t->block_shift;
    *s = halves8(t->d + b * GI8_TILE + h * 8);
    if (t->sc)
        *s = _mm256_mul_ps(*s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes8(t->sc + g * GI8_TILE + h * 8))));
    if (t->m == NULL) {
        *o = _mm256_mul_ps(*s, _mm256_set1_ps(t->neg_zero));
        return;
    }
    *o = halves8(t->m + b * GI8_TILE + h * 8);
    if (t->mins)
        *o = _mm256_mul_ps(*o, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8(t->mins + g * GI8_TILE + h * 8))));
}

/* Rows 8 h .. 8 h + 7 of a tile (h = half) times mr (up to GI8_AVX2_ROWS) activation rows; out[m * 16 + r]. */
static inline __attribute__((always_inline)) void
half_tile_dots(const gi8_tile *t, const signed char *xq, const float *xscale, const float *xsum, long k, float *out,
               const int h, const int mr, const int bits, const int group) {
    const unsigned char *codes = t->codes;
    __m256 acc[GI8_AVX2_ROWS];
    for (int m = 0; m < mr; m++) acc[m] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
    const long groups = k / group;
    for (long g = 0; g < groups; g++) {
        /* int16 sums of nibble products: lo and hi nibbles (8-bit), or columns c..c+3 and c+4..c+7 (4-bit);
         * 6-bit: int32 sums in dlo */
        __m256i dlo[GI8_AVX2_ROWS], dhi[GI8_AVX2_ROWS];
        for (int m = 0; m < mr; m++) dlo[m] = dhi[m] = _mm256_setzero_si256();
        const long c0 = g * group;
        if (h == 0) prefetch_codes(codes, c0, group, bits);   /* the second half reads the lines the first did */
        if (bits == 6) {   /* codes below 64: a pair sum is at most 2 x 63 x 127, two of them fit an int16 */
            for (long c = c0; c < c0 + group; c += 8) {
                __m256i w, w2;
                six_bit_pair(codes, c, h, &w, &w2);
                for (int m = 0; m < mr; m++) {
                    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(w, bcast4_256(xq + m * k + c)),
                                                           _mm256_maddubs_epi16(w2, bcast4_256(xq + m * k + c + 4)));
                    dlo[m] = _mm256_add_epi32(dlo[m], _mm256_madd_epi16(pairs, ones));
                }
            }
        } else if (bits == 8) {
            for (long c = c0; c < c0 + group; c += 4) {
                const __m256i w = _mm256_loadu_si256((const void *)(codes + c * GI8_TILE + h * 32));
                const __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
                for (int m = 0; m < mr; m++) {
                    const __m256i a = bcast4_256(xq + m * k + c);
                    dlo[m] = _mm256_add_epi16(dlo[m], _mm256_maddubs_epi16(lo, a));
                    dhi[m] = _mm256_add_epi16(dhi[m], _mm256_maddubs_epi16(hi, a));
                }
            }
        } else {
            for (long c = c0; c < c0 + group; c += 8) {
                const __m256i w = _mm256_loadu_si256((const void *)(codes + c * GI8_TILE / 2 + h * 32));
                const __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
                for (int m = 0; m < mr; m++) {
                    dlo[m] = _mm256_add_epi16(dlo[m], _mm256_maddubs_epi16(lo, bcast4_256(xq + m * k + c)));
                    dhi[m] = _mm256_add_epi16(dhi[m], _mm256_maddubs_epi16(hi, bcast4_256(xq + m * k + c + 4)));
                }
            }
        }
        __m256 s, o;
        group_scales(t, g, h, &s, &o);
        for (int m = 0; m < mr; m++) {
            const __m256i dot = bits == 6 ? dlo[m]
                                          : _mm256_add_epi32(_mm256_madd_epi16(dlo[m], ones),
                                                             _mm256_madd_epi16(dhi[m], bits == 8 ? sixteen : ones));
            const __m256 sx = _mm256_mul_ps(s, _mm256_set1_ps(xscale[m * (k / GI8_XBLOCK) + c0 / GI8_XBLOCK]));
            acc[m] = _mm256_fmadd_ps(sx, _mm256_cvtepi32_ps(dot), acc[m]);
            acc[m] = _mm256_fmadd_ps(o, _mm256_set1_ps(group_xsum(xsum + m * (k / GI8_XSUM), g, group)), acc[m]);
        }
    }
    for (int m = 0; m < mr; m++) _mm256_storeu_ps(out + m * GI8_TILE + h * 8, acc[m]);
}

/* One tile of 16 output rows times mr activation rows, as half-tiles of GI8_AVX2_ROWS rows at a time (the
 * tile's codes stay in L1 between them); out[m * 16 + r]. */
static inline __attribute__((always_inline)) void
tile_dots(const gi8_tile *t, const signed char *xq, const float *xscale, const float *xsum, long k, float *out,
          const int mr, const int bits, const int group) {
    for (int m0 = 0; m0 < mr; m0 += GI8_AVX2_ROWS) {
        const int n = mr - m0 < GI8_AVX2_ROWS ? mr - m0 : GI8_AVX2_ROWS;
        for (int h = 0; h < 2; h++)
            half_tile_dots(t, xq + m0 * k, xscale + m0 * (k / GI8_XBLOCK),
                           xsum + m0 * (k / GI8_XSUM), k, out + m0 * GI8_TILE, h, n, bits, group);
    }
}

/* The many-row path: rows 8 h .. 8 h + 7 of a tile times `rows` activation rows, one span of 32 columns (an
 * activation block) at a time. The span's codes, unpacked, stay in eight registers (vector j: columns 4 j ..
 * 4 j + 3) while every row streams past them, so the unpacking is shared by all the rows and no row needs
 * registers of its own beyond its running sums (the few-row path's register tile runs out of registers at 8
 * rows). The activations come span-major (gemm_tiles' copy: span s's rows are contiguous, where rows k bytes
 * apart would fall into a few L1 sets). out[m * 16 + 8 h + r] += the span's terms, in tile_dots' order. */
static inline __attribute__((always_inline)) void
half_tile_rows(const gi8_tile *t, const gi8_spans *x, long rows, long k, float *out, const int h, const int bits,
               const int group) {
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const int groups = GI8_XBLOCK / group, per_group = 8 / groups;   /* groups per span, code vectors per group */
    for (long c0 = 0; c0 < k; c0 += GI8_XBLOCK) {
        __m256i w[8];
        for (int j = 0; j < 8; j += 2) {
            if (bits == 4) {   /* low nibbles: columns c..c+3 of an 8-column step, high ones: c+4..c+7 */
                const __m256i p = _mm256_loadu_si256((const void *)(t->codes + (c0 + 4 * j) * GI8_TILE / 2 + h * 32));
                w[j] = _mm256_and_si256(p, low);
                w[j + 1] = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
            } else if (bits == 6) {
                six_bit_pair(t->codes, c0 + 4 * j, h, &w[j], &w[j + 1]);
            } else {
                w[j] = _mm256_loadu_si256((const void *)(t->codes + (c0 + 4 * j) * GI8_TILE + h * 32));
                w[j + 1] = _mm256_loadu_si256((const void *)(t->codes + (c0 + 4 * j + 4) * GI8_TILE + h * 32));
            }
        }
        __m256i signs[8];   /* 8-bit codes: code - 128, whose sign goes onto the activations */
        if (bits == 8)
            for (int j = 0; j < 8; j++) {
                signs[j] = _mm256_xor_si256(w[j], _mm256_set1_epi8((char)0x80));
                w[j] = _mm256_abs_epi8(signs[j]);   /* |code - 128| <= 128, as u8 */
            }
        __m256 s[2], o[2];
        for (int q = 0; q < groups; q++) group_scales(t, c0 / group + q, h, &s[q], &o[q]);
        const long span = c0 / GI8_XBLOCK;
        const signed char *xq = x->q + span * rows * GI8_XBLOCK;
        const float *xscale = x->scale + span * rows, *xsum = x->sums + span * rows * groups;
        const int *x128 = bits == 8 ? x->sums128 + span * rows * groups : NULL;
        #pragma GCC unroll 2
        for (long m = 0; m < rows; m++) {
            const signed char *xm = xq + m * GI8_XBLOCK;
            const __m256 xs = _mm256_set1_ps(xscale[m]);
            float *acc = out + m * GI8_TILE + h * 8;
            __m256 a = _mm256_loadu_ps(acc);
            for (int q = 0; q < groups; q++) {
                const int j0 = q * per_group;
                __m256i dot;
                if (bits == 4) {   /* int16 sums: a lane adds at most 16 products of 15 x 127 */
                    /* two chains, kept apart (the compiler would otherwise fold them into one long chain) */
                    __m256i even = _mm256_setzero_si256(), odd = _mm256_setzero_si256();
                    for (int j = j0; j < j0 + per_group; j += 2) {
                        even = _mm256_add_epi16(even, _mm256_maddubs_epi16(w[j], bcast4_256(xm + 4 * j)));
                        odd = _mm256_add_epi16(odd, _mm256_maddubs_epi16(w[j + 1], bcast4_256(xm + 4 * j + 4)));
                        __asm__("" : "+x"(even), "+x"(odd));
                    }
                    dot = _mm256_madd_epi16(_mm256_add_epi16(even, odd), ones);
                } else if (bits == 8) {   /* (code - 128) x as |code - 128| x sign: a pair sum <= 2 x 128 x 127 */
                    __m256i pairs[8];
                    for (int j = j0; j < j0 + per_group; j++)
                        pairs[j - j0] = _mm256_madd_epi16(_mm256_maddubs_epi16(
                            w[j], _mm256_sign_epi8(bcast4_256(xm + 4 * j), signs[j])), ones);
                    for (int n = per_group; n > 1; n /= 2)
                        for (int i = 0; i < n / 2; i++) pairs[i] = _mm256_add_epi32(pairs[2 * i], pairs[2 * i + 1]);
                    /* + 128 sum(x): the codes' own dot product */
                    dot = _mm256_add_epi32(pairs[0], _mm256_set1_epi32(x128[m * groups + q]));
                } else {   /* codes below 64: two pair sums fit an int16, widened to int32 and added as a tree */
                    __m256i pairs[4];
                    for (int j = j0; j < j0 + per_group; j += 2)
                        pairs[(j - j0) / 2] = _mm256_madd_epi16(
                            _mm256_add_epi16(_mm256_maddubs_epi16(w[j], bcast4_256(xm + 4 * j)),
                                             _mm256_maddubs_epi16(w[j + 1], bcast4_256(xm + 4 * j + 4))), ones);
                    dot = _mm256_add_epi32(pairs[0], pairs[1]);
                    if (per_group == 8) dot = _mm256_add_epi32(dot, _mm256_add_epi32(pairs[2], pairs[3]));
                }
                a = _mm256_fmadd_ps(_mm256_mul_ps(s[q], xs), _mm256_cvtepi32_ps(dot), a);
                a = _mm256_fmadd_ps(o[q], _mm256_set1_ps(xsum[m * groups + q]), a);
            }
            _mm256_storeu_ps(acc, a);
        }
    }
}

/* The many-row path of llmserve_group_int8_linear: GI8_AVX2_CHUNK rows at a time, copied
 * span-major (they stay in L2 while every tile passes), the threads sharing the copy and then the tiles.
 * Returns 0, or -2 without memory for the copy. */
static int gemm_tiles(const signed char *xq, const float *xscale, const float *xsum, long M, long k,
                      const gi8_weight *wt, const float *bias, float *y, long y_stride, int num_threads) {
    const long n = wt->rows, tiles = (n + GI8_TILE - 1) / GI8_TILE, spans = k / GI8_XBLOCK;
    const int bits = wt->bits, group = wt->group, groups = GI8_XBLOCK / group;
    signed char *q = malloc((size_t)(GI8_AVX2_CHUNK * k));
    float *scale = malloc(sizeof(float) * (size_t)(GI8_AVX2_CHUNK * spans));
    float *sums = malloc(sizeof(float) * (size_t)(GI8_AVX2_CHUNK * spans * groups));
    int *sums128 = bits == 8 ? malloc(sizeof(int) * (size_t)(GI8_AVX2_CHUNK * spans * groups)) : NULL;
    if (!q || !scale || !sums || (bits == 8 && !sums128)) {
        free(q);
        free(scale);
        free(sums);
        free(sums128);
        return -2;
    }
    #pragma omp parallel num_threads(num_threads)
    for (long m0 = 0; m0 < M; m0 += GI8_AVX2_CHUNK) {
        const long rows = M - m0 < GI8_AVX2_CHUNK ? M - m0 : GI8_AVX2_CHUNK;
        #pragma omp for schedule(static)
        for (long sp = 0; sp < spans; sp++)
            for (long m = 0; m < rows; m++) {
                memcpy(q + (sp * rows + m) * GI8_XBLOCK, xq + (m0 + m) * k + sp * GI8_XBLOCK, GI8_XBLOCK);
                scale[sp * rows + m] = xscale[(m0 + m) * spans + sp];
                for (int g = 0; g < groups; g++) {
                    sums[(sp * rows + m) * groups + g] = group_xsum(xsum + (m0 + m) * (k / GI8_XSUM),
                                                                    sp * groups + g, group);
                    if (bits == 8) {
                        int total = 0;
                        for (int c = 0; c < group; c++) total += xq[(m0 + m) * k + sp * GI8_XBLOCK + g * group + c];
                        sums128[(sp * rows + m) * groups + g] = 128 * total;
                    }
                }
            }
        const gi8_spans x = {q, scale, sums, sums128};
        #pragma omp for schedule(static)
        for (long ti = 0; ti < tiles; ti++) {
            const gi8_tile tile = tile_at(wt, k, ti);
            const long cols = n - ti * GI8_TILE < GI8_TILE ? n - ti * GI8_TILE : GI8_TILE;
            float out[GI8_AVX2_CHUNK * GI8_TILE];
            memset(out, 0, sizeof(float) * (size_t)(rows * GI8_TILE));
            for (int h = 0; h < 2; h++) {
                if (bits == 4 && group == 32) half_tile_rows(&tile, &x, rows, k, out, h, 4, 32);
                else if (bits == 4) half_tile_rows(&tile, &x, rows, k, out, h, 4, 16);
                else if (bits == 6 && group == 32) half_tile_rows(&tile, &x, rows, k, out, h, 6, 32);
                else if (bits == 6) half_tile_rows(&tile, &x, rows, k, out, h, 6, 16);
                else if (group == 32) half_tile_rows(&tile, &x, rows, k, out, h, 8, 32);
                else half_tile_rows(&tile, &x, rows, k, out, h, 8, 16);
            }
            for (long m = 0; m < rows; m++)
                for (long r = 0; r < cols; r++)
                    y[(m0 + m) * y_stride + ti * GI8_TILE + r] = out[m * GI8_TILE + r]
                                                                 + (bias ? bias[ti * GI8_TILE + r] : 0.f);
        }
    }
    free(q);
    free(scale);
    free(sums);
    free(sums128);
    return 0;
}

#endif
