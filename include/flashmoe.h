/*
 * flashmoe.h — the C ABI of FlashMoE (libflashmoe.so).
 *
 * One MoE layer (gate, top-k routing, expert FFNs, combine) behind an opaque handle, on the GPU (one fused kernel
 * launch per forward, enqueued on the caller's stream) or on the CPU backend (host pointers, synchronous).
 *
 * Conventions
 *   - Every call returns a flashmoe_status_t; FLASHMOE_SUCCESS is 0. On failure, flashmoe_last_error() returns a
 *     message for the calling thread that names the argument and what it expects. The message stays valid until the
 *     thread's next call into the library.
 *   - Outputs are written through pointers. Handles are pointers to undeclared structs.
 *   - Structs start with `size` and `version`; initialise them with their FLASHMOE_*_INIT macro so fields can be
 *     added in later versions without breaking callers.
 *   - Matrices are row-major, contiguous, in Hugging Face's [out, in] layout; the dtype of every matrix and of x is
 *     the precision's storage type (float32 for FP32/TF32, bfloat16 for BF16 and FP8, float16 for FP16); biases,
 *     the selection bias, block scales and routing weights are float32; expert ids are int32. FP8 layers take the
 *     routed experts' matrices (gate_up or gate and up, down) either in bfloat16, quantized once at create, or as
 *     E4M3 codes (one byte each, torch.float8_e4m3fn) with their block scales (see flashmoe_weights_t).
 *   - GPU layers: pointers are device pointers of the layer's device (primary context). A forward only enqueues
 *     work on `stream` (no host synchronisation, no allocation, no copies): it can be captured in a CUDA graph and
 *     replayed. Errors the kernel finds after the call returned (a timed-out wait) surface on the next forward,
 *     on flashmoe_layer_check(), or at once with FLASHMOE_FLAG_SYNC_ERRORS.
 *   - CPU layers: pointers are host pointers; the forward runs before it returns; `stream` must be NULL.
 *   - A layer may be used from several threads, one call at a time (calls are serialised internally).
 *   - Non-finite input (docs/nonfinite.md) is data, not an error: a NaN logit never selects an expert, so a token
 *     with a NaN in x gets topk_ids = -1 and topk_weights = 0 for every rank and y = 0 (NaN with a shared expert);
 *     ids are always in [0, E) or -1. Every other token is bit-identical to a run without the fault. A non-finite
 *     selection bias is refused at create (FLASHMOE_ERROR_INVALID_ARGUMENT).
 */
#ifndef FLASHMOE_H
#define FLASHMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FLASHMOE_VERSION_MAJOR 0
#define FLASHMOE_VERSION_MINOR 5
#define FLASHMOE_VERSION_PATCH 0
/** MAJOR * 10000 + MINOR * 100 + PATCH: compare with flashmoe_version() to catch a header/library mismatch. */
#define FLASHMOE_VERSION (FLASHMOE_VERSION_MAJOR * 10000 + FLASHMOE_VERSION_MINOR * 100 + FLASHMOE_VERSION_PATCH)

/** Status codes (explicit values; new codes are added before FLASHMOE_NUM_STATUS). */
typedef enum {
    FLASHMOE_SUCCESS = 0,
    FLASHMOE_ERROR_INVALID_ARGUMENT = 1, /* a bad pointer, shape, dtype, token count or config field */
    FLASHMOE_ERROR_UNSUPPORTED = 2,      /* valid, but not supported here (architecture, precision, backend) */
    FLASHMOE_ERROR_CUDA = 3,             /* the driver or NVRTC failed, or no usable GPU */
    FLASHMOE_ERROR_OUT_OF_MEMORY = 4,    /* device or host memory does not suffice */
    FLASHMOE_ERROR_KERNEL = 5,           /* the kernel reported a fault (a timed-out wait); the layer is reset */
    FLASHMOE_ERROR_INTERNAL = 6,         /* a bug: please report the message */
    FLASHMOE_ERROR_GROUP = 7,            /* groups: another rank gave up or left, or the caller's all-gather failed */
    FLASHMOE_NUM_STATUS = 8
} flashmoe_status_t;

/** Where the layer runs. */
typedef enum { FLASHMOE_BACKEND_CUDA = 0, FLASHMOE_BACKEND_CPU = 1 } flashmoe_backend_t;

/** Storage and multiply precision. */
typedef enum {
    FLASHMOE_PRECISION_FP32 = 0,
    FLASHMOE_PRECISION_TF32 = 1,
    FLASHMOE_PRECISION_BF16 = 2,
    FLASHMOE_PRECISION_FP16 = 3,
    /** Block-scaled FP8 routed experts (since 0.5; docs/fp8.md): expert weights E4M3 with one float32 scale per
     *  128x128 block, activations quantized per token and 128 channels before each expert GEMM, float32
     *  accumulation. x, y, the router and the shared expert are bfloat16. GPU layers need sm_90a (or sm_89) and,
     *  while the kernel's fp8 path is experimental, FLASHMOE_EXPERIMENTAL_FP8=1 in the environment (create returns
     *  FLASHMOE_ERROR_UNSUPPORTED saying so otherwise); CPU layers run it always. Groups: not supported. */
    FLASHMOE_PRECISION_FP8 = 4
} flashmoe_precision_t;

typedef enum { FLASHMOE_FFN_PLAIN = 0, FLASHMOE_FFN_GATED = 1 } flashmoe_ffn_t;

typedef enum {
    FLASHMOE_ACT_RELU = 0,
    FLASHMOE_ACT_GELU = 1,
    FLASHMOE_ACT_GELU_TANH = 2,
    FLASHMOE_ACT_SILU = 3
} flashmoe_activation_t;

typedef enum {
    FLASHMOE_ROUTER_SOFTMAX = 0, /* softmax over E, top-k (renormalised when `renormalize`) */
    FLASHMOE_ROUTER_SIGMOID = 1  /* DeepSeek-V3: sigmoid, group-limited top-k, selection bias, scaling */
} flashmoe_router_t;

/** Layout of the gated FFN's first-layer weights. */
typedef enum {
    /** `gate_up` [E, 2I, H]: rows 0..I-1 of each expert are the gate (W1), rows I..2I-1 the up projection (W3) —
     *  transformers 5's fused `gate_up_proj`. Plain FFNs: `gate_up` is W1 [E, I, H]. */
    FLASHMOE_LAYOUT_FUSED = 0,
    /** `gate` and `up` separately, each [E, I, H] (stacked per-expert w1 and w3). */
    FLASHMOE_LAYOUT_SEPARATE = 1
} flashmoe_layout_t;

/** Output element type of the GPU forward. */
typedef enum {
    FLASHMOE_OUTPUT_STORAGE = 0, /* the precision's storage type (bf16 for BF16 layers), as frameworks expect */
    FLASHMOE_OUTPUT_FLOAT32 = 1
} flashmoe_output_t;

/** flashmoe_config_t.flags */
#define FLASHMOE_FLAG_SYNC_ERRORS 1u   /* debug: synchronise after every forward and report kernel errors at once */
#define FLASHMOE_FLAG_INJECT_FAULT 2u  /* tests (GPU layers): the layer's first forward skips one publication in the
                                          kernel, so a wait times out (reported as FLASHMOE_ERROR_KERNEL by the next
                                          forward or check); later forwards run normally */
#define FLASHMOE_FLAG_STORAGE_RETURNS 4u /* bf16/fp16 layers and groups: the routed experts' output rows are kept in the
                                          storage type instead of float32 (groups: the rows sent back to the
                                          token's rank; layers: the rows the combine reads), halving
                                          those bytes; y then differs from float32 rows' by one rounding of each
                                          expert output (flashmoe verify measures it), the same for a layer and a
                                          group, so a group's y equals one layer's when both set it. A 32-bit layer
                                          with it: FLASHMOE_ERROR_INVALID_ARGUMENT */

#define FLASHMOE_CONFIG_MAGIC 0x464d4f45u /* "FMOE" */

/** A layer's shape and options. Initialise with FLASHMOE_CONFIG_INIT, then set fields. */
typedef struct {
    size_t size;      /* sizeof(flashmoe_config_t) */
    uint32_t magic;   /* FLASHMOE_CONFIG_MAGIC */
    uint32_t version; /* FLASHMOE_VERSION */
    int32_t hidden;       /* H */
    int32_t intermediate; /* I */
    int32_t experts;      /* E */
    int32_t top_k;        /* k */
    int32_t ffn;          /* flashmoe_ffn_t */
    int32_t activation;   /* flashmoe_activation_t */
    int32_t bias;         /* plain FFN: 1 when b1 [E, I] and b2 [E, H] are given */
    int32_t router;       /* flashmoe_router_t */
    int32_t renormalize;  /* renormalise the top-k weights to sum to 1 */
    int32_t groups;       /* sigmoid router: expert groups (1 = none) */
    int32_t groups_kept;  /* sigmoid router: groups kept (1 = none) */
    int32_t selection_bias; /* sigmoid router: 1 when a selection bias [E] is given */
    float scaling;        /* routed scaling factor (1 = none) */
    int32_t shared_intermediate; /* shared expert's I (0 = none) */
    int32_t shared_gated;        /* 1 when the shared expert has a sigmoid gate row [H] */
    float capacity_factor;       /* 0 = dropless, else capacity = ceil(S/E) * factor * k */
    int32_t precision;    /* flashmoe_precision_t */
    int32_t backend;      /* flashmoe_backend_t */
    int32_t device;       /* CUDA device ordinal */
    int32_t output;       /* flashmoe_output_t (GPU layers) */
    int64_t max_tokens;   /* the most tokens one forward may pass; the workspace is sized for it once */
    uint32_t flags;       /* FLASHMOE_FLAG_* */
    uint32_t wait_budget_ms; /* every device-side wait's budget (0 = the default, 5000 ms) */
} flashmoe_config_t;

#define FLASHMOE_CONFIG_INIT                                                                                        \
    {                                                                                                               \
        sizeof(flashmoe_config_t), FLASHMOE_CONFIG_MAGIC, FLASHMOE_VERSION, 0, 0, 0, 0, FLASHMOE_FFN_GATED,       \
            FLASHMOE_ACT_SILU, 0, FLASHMOE_ROUTER_SOFTMAX, 1, 1, 1, 0, 1.0f, 0, 0, 0.0f, FLASHMOE_PRECISION_BF16, \
            FLASHMOE_BACKEND_CUDA, 0, FLASHMOE_OUTPUT_STORAGE, 0, 0u, 0u                                            \
    }

/** Weight pointers (device pointers for GPU layers, host pointers for CPU layers). NULL where absent.
 *  The library copies or packs what it needs at creation (see "Weights" in the README's "Use from C" section);
 *  the caller may free its weights after flashmoe_layer_create returns. Every pointer the config does not call for
 *  must be NULL (create names the field otherwise), and each must be aligned to its element type.
 *
 *  FP8 layers (FLASHMOE_PRECISION_FP8): with every *_scale pointer of the layout NULL, the routed experts'
 *  matrices are bfloat16 and create quantizes them (as `flashmoe run --precision fp8` does a BF16 checkpoint; GPU
 *  layers in chunks of experts of at most 256 MiB of bfloat16, or one expert, which create holds in temporary
 *  device memory with their codes: up to 1.5 times that; docs/fp8.md says where they are quantized).
 *  With them set, those matrices are E4M3 codes (uint8 bit patterns of float8_e4m3fn) and each *_scale is the
 *  matrices' float32 dequantization scales, one per 128x128 block: [E, ceil(rows / 128), ceil(cols / 128)], as
 *  DeepSeek-V3's `weight_scale_inv` (value = code * scale). FUSED: gate_up_scale covers gate_up's 2I rows (I must
 *  be a multiple of 128, so no block holds gate and up rows); SEPARATE: gate_scale and, gated, up_scale. Always
 *  down_scale. Every other layer: the *_scale pointers must be NULL. The shared expert and the router stay
 *  bfloat16. A struct of version 0.4 (without the *_scale fields, its `size` that version's) is still accepted. */
typedef struct {
    size_t size;      /* sizeof(flashmoe_weights_t) */
    uint32_t version; /* FLASHMOE_VERSION */
    int32_t layout;   /* flashmoe_layout_t */
    const void *router;         /* [E, H] */
    const void *selection_bias; /* [E] float32 (sigmoid router with selection_bias) */
    const void *gate_up;        /* FUSED: [E, 2I, H] (gated) or W1 [E, I, H] (plain) */
    const void *gate;           /* SEPARATE: W1 [E, I, H] */
    const void *up;             /* SEPARATE: W3 [E, I, H] */
    const void *down;           /* W2 [E, H, I] */
    const void *b1;             /* [E, I] float32 (plain FFN with bias) */
    const void *b2;             /* [E, H] float32 (plain FFN with bias) */
    const void *shared_gate_up; /* FUSED: [2·IS, H] (gated) or [IS, H]; SEPARATE: shared W1 [IS, H] */
    const void *shared_up;      /* SEPARATE, gated: shared W3 [IS, H] */
    const void *shared_down;    /* [H, IS] */
    const void *shared_gate;    /* [H] storage type: the shared expert's sigmoid gate row (shared_gated) */
    /* since 0.5: FP8 block scales (float32) of E4M3 expert matrices; see above */
    const float *gate_up_scale; /* FUSED: [E, ceil(2I / 128), ceil(H / 128)] (gated) or [E, ceil(I / 128), ...] */
    const float *gate_scale;    /* SEPARATE: [E, ceil(I / 128), ceil(H / 128)] */
    const float *up_scale;      /* SEPARATE, gated: [E, ceil(I / 128), ceil(H / 128)] */
    const float *down_scale;    /* [E, ceil(H / 128), ceil(I / 128)] */
} flashmoe_weights_t;

#define FLASHMOE_WEIGHTS_INIT                                                                                       \
    {                                                                                                               \
        sizeof(flashmoe_weights_t), FLASHMOE_VERSION, FLASHMOE_LAYOUT_FUSED, NULL, NULL, NULL, NULL, NULL, NULL,  \
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL                                              \
    }

/** What a layer holds, for the caller's bookkeeping. */
typedef struct {
    size_t size;               /* sizeof(flashmoe_layer_info_t), set by the caller */
    int64_t max_tokens;        /* as created */
    int64_t weight_bytes;      /* bytes the library holds for weights (packed copies) */
    int64_t workspace_bytes;   /* bytes of the per-call workspace (allocated once) */
    int32_t backend;           /* flashmoe_backend_t */
    int32_t device;            /* CUDA device ordinal (GPU layers) */
    int32_t grid_blocks;       /* blocks of the persistent grid (GPU layers) */
    int32_t reserved;
} flashmoe_layer_info_t;

/** Opaque layer handle. */
typedef struct flashmoe_layer_s *flashmoe_layer_t;

/** The library's version, FLASHMOE_VERSION of the header it was built with. */
int flashmoe_version(void);

/** Fixed text for a status code (never NULL). */
const char *flashmoe_status_string(flashmoe_status_t status);

/** The calling thread's message for its last failed call ("" when none). */
const char *flashmoe_last_error(void);

/** Creates a layer: validates the config, compiles (or loads the cached) kernel, copies or packs the weights and
 *  allocates the workspace for config->max_tokens. Writes the handle to *layer. */
flashmoe_status_t flashmoe_layer_create(const flashmoe_config_t *config, const flashmoe_weights_t *weights,
                                        flashmoe_layer_t *layer);

/** One forward over `tokens` rows (0 <= tokens <= max_tokens) of x [tokens, H].
 *  y [tokens, H] (storage type or float32, see config->output; float32 on the CPU backend);
 *  topk_ids [tokens, k] int32 and topk_weights [tokens, k] float32 are optional (NULL to skip).
 *  GPU: enqueued on `stream` (a CUstream of the layer's device; NULL = the legacy default stream); returns once
 *  enqueued. CPU: `stream` must be NULL; runs before returning. */
flashmoe_status_t flashmoe_layer_forward(flashmoe_layer_t layer, const void *x, void *y, int64_t tokens,
                                         int32_t *topk_ids, float *topk_weights, void *stream);

/** Reports a kernel error recorded by an earlier forward (FLASHMOE_ERROR_KERNEL, the layer then reset), without
 *  synchronising; FLASHMOE_SUCCESS when none has been seen yet. With `synchronize` != 0 it first waits for the
 *  layer's work on `stream`. */
flashmoe_status_t flashmoe_layer_check(flashmoe_layer_t layer, int synchronize, void *stream);

/** Fills *info (set info->size first). */
flashmoe_status_t flashmoe_layer_info(flashmoe_layer_t layer, flashmoe_layer_info_t *info);

/** Frees the layer. The caller must make sure no work of the layer is still running on the GPU. NULL is a no-op. */
flashmoe_status_t flashmoe_layer_destroy(flashmoe_layer_t layer);

/* ---------------------------------------------------------------------------------------------------------------
 * Expert-parallel groups: one process per GPU (since 0.4)
 *
 * Each of world_size processes (torchrun, MPI, ...) creates one rank of the group on its GPU, with its share of
 * the experts (E experts in contiguous blocks, the first E mod world_size ranks one larger: flashmoe_expert_range).
 * The ranks meet through the caller's all-gather (flashmoe_allgather_fn), exchange CUDA IPC handles of their
 * buffers, and then every forward is one kernel launch per rank: each rank routes its own tokens, stores the rows
 * for other ranks' experts straight into their buffers and combines its own tokens' results. With the same global
 * tokens, y, topk_ids and topk_weights are bitwise those of one layer over all tokens given the same gate split
 * (flashmoe_group_info_t.gate_split). All ranks must be on one node (IPC); between nodes is not built.
 *
 * Collective calls: flashmoe_group_create, flashmoe_group_destroy, and flashmoe_group_forward with
 * tokens_per_rank == NULL (it all-gathers the token counts). Every rank makes the same collective calls in the
 * same order; every rank calls flashmoe_group_forward once per step. A rank whose create fails tells the others
 * through the all-gather, so every rank returns an error (FLASHMOE_ERROR_GROUP where another rank gave up).
 *
 * Unlike a layer, a group's forward is NOT capturable in a CUDA graph: the epoch that tags the device flags is
 * counted by the host and passed to each launch. A forward whose token counts or pointers differ from the previous
 * one's writes the rank's parameters with one copy ordered on `stream`; otherwise it only launches. Errors the
 * kernel finds (a rank died or stopped calling: a device wait expired within config->wait_budget_ms) surface on
 * flashmoe_group_check, or at once with FLASHMOE_FLAG_SYNC_ERRORS; after one the group is unusable: destroy it on
 * every rank and create it again.
 * ------------------------------------------------------------------------------------------------------------- */

/** The caller's all-gather of equal-sized blocks: every rank passes `bytes` bytes at `send` (bytes >= 1, the same
 *  count on every rank in one call) and receives every rank's block in rank order at `recv` (world_size * bytes).
 *  Returns 0 on success, anything else on failure. Called only from within the group's collective calls, on the
 *  calling thread. It must span exactly the group's world_size processes, with each process's `rank` its position
 *  in it; the library checks both on every step and reports a mismatch on every rank. It is as bounded as the
 *  caller's collective (e.g. torch.distributed's process-group timeout). */
typedef int (*flashmoe_allgather_fn)(void *ctx, const void *send, size_t bytes, void *recv);

/** What flashmoe_weights_t's per-expert tensors (gate_up or gate + up, down, b1, b2) hold for a group. */
typedef enum {
    FLASHMOE_GROUP_WEIGHTS_ALL = 0,  /* every expert ([E, ...]); the rank copies its share */
    FLASHMOE_GROUP_WEIGHTS_SHARD = 1 /* only this rank's experts ([local experts, ...], flashmoe_expert_range) */
} flashmoe_group_weights_t;

/** A rank's place in its group. Initialise with FLASHMOE_GROUP_CONFIG_INIT, then set fields. */
typedef struct {
    size_t size;      /* sizeof(flashmoe_group_config_t) */
    uint32_t version; /* FLASHMOE_VERSION */
    int32_t world_size;  /* ranks in the group, 1 <= world_size <= config->experts */
    int32_t rank;        /* this process's rank, 0 <= rank < world_size (its position in the all-gather) */
    int32_t weights;     /* flashmoe_group_weights_t */
    flashmoe_allgather_fn allgather; /* required */
    void *ctx;                       /* passed to allgather */
} flashmoe_group_config_t;

#define FLASHMOE_GROUP_CONFIG_INIT                                                                                  \
    { sizeof(flashmoe_group_config_t), FLASHMOE_VERSION, 0, 0, FLASHMOE_GROUP_WEIGHTS_ALL, NULL, NULL }

/** What a rank holds. */
typedef struct {
    size_t size;             /* sizeof(flashmoe_group_info_t), set by the caller */
    int64_t max_tokens;      /* the most tokens one rank may pass to one forward (config->max_tokens) */
    int64_t weight_bytes;    /* device bytes of this rank's weights (its experts, the router, the shared expert) */
    int64_t workspace_bytes; /* device bytes of its buffers (workspace, receive and return rows, control block) */
    int32_t world_size;
    int32_t rank;
    int32_t first_expert;    /* this rank's experts: [first_expert, first_expert + local_experts) */
    int32_t local_experts;
    int32_t device;          /* CUDA device ordinal */
    int32_t grid_blocks;     /* blocks of each rank's launch (the smallest among the ranks) */
    int32_t gate_split;      /* the gate's K split of the last forward (0 before the first, and for the decode
                                gate of a forward of at most 8 tokens, as a single-rank layer uses then too) */
    int32_t reserved;
} flashmoe_group_info_t;

/** Opaque group (rank) handle. */
typedef struct flashmoe_group_s *flashmoe_group_t;

/** The experts rank `rank` of `world_size` owns for `experts` experts: [*first, *first + *count). */
flashmoe_status_t flashmoe_expert_range(int32_t experts, int32_t world_size, int32_t rank, int32_t *first,
                                        int32_t *count);

/** Collective. Creates this process's rank: checks the config (config->backend must be FLASHMOE_BACKEND_CUDA),
 *  the weights (device pointers on config->device, as flashmoe_weights_t describes, per-expert tensors as
 *  group_config->weights says) and group_config; then, through the all-gather, checks that every rank has the
 *  same world size, a distinct rank, the same config and router values, driver, node and max_tokens; compiles the
 *  kernel, copies this rank's weights, allocates its buffers for max_tokens tokens on every rank and maps every
 *  peer's. Writes the handle to *group. */
flashmoe_status_t flashmoe_group_create(const flashmoe_config_t *config, const flashmoe_weights_t *weights,
                                        const flashmoe_group_config_t *group_config, flashmoe_group_t *group);

/** One forward of this rank's `tokens` rows (0 <= tokens <= max_tokens; 0 still takes part) of x [tokens, H]
 *  into y [tokens, H] (storage type or float32, see config->output), topk_ids / topk_weights optional, enqueued on
 *  `stream` (a CUstream of the rank's device; NULL = the legacy default stream). `tokens_per_rank`: every rank's
 *  token count this step (world_size entries, entry `rank` == tokens), or NULL to all-gather them (a collective
 *  and a host round trip per call). x and y may be NULL when tokens == 0. */
flashmoe_status_t flashmoe_group_forward(flashmoe_group_t group, const void *x, void *y, int64_t tokens,
                                         const int64_t *tokens_per_rank, int32_t *topk_ids, float *topk_weights,
                                         void *stream);

/** Reports a kernel error recorded by the group (FLASHMOE_ERROR_KERNEL; the group is then unusable), without
 *  waiting for queued work; with `synchronize` != 0 it first waits for `stream`. */
flashmoe_status_t flashmoe_group_check(flashmoe_group_t group, int synchronize, void *stream);

/** Fills *info (set info->size first). */
flashmoe_status_t flashmoe_group_info(flashmoe_group_t group, flashmoe_group_info_t *info);

/** Collective (unless the group failed). Waits for the rank's device, then for every rank to be idle, unmaps the
 *  peers, waits for every rank to have unmapped, and frees the rank. NULL is a no-op. */
flashmoe_status_t flashmoe_group_destroy(flashmoe_group_t group);

#ifdef __cplusplus
}
#endif

#endif /* FLASHMOE_H */
