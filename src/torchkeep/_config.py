"""Tuning constants, in one place so tests can override them."""

from __future__ import annotations

# Largest JSON header we accept; safetensors uses the same bound. Checked before allocating.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Header is padded with spaces so the data region starts on this boundary.
HEADER_ALIGNMENT = 8
# Tensors below this size are read through a shared buffer instead of one read call each.
SMALL_TENSOR_BYTES = 256 * 1024
# Size of that shared buffer (and of the batches small tensors are written in).
SMALL_BATCH_BYTES = 8 * 1024 * 1024
# Largest single write or read call; Linux moves at most ~2 GiB per call.
MAX_IO_CHUNK = 1 << 30
# Names of the sharded layout, as Hugging Face writes it.
SHARD_TEMPLATE = "model-{index:05d}-of-{count:05d}.safetensors"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
# JSON documents (manifests, indexes, configs): largest accepted, and deepest nesting.
MAX_JSON_BYTES = 1 << 30
MAX_JSON_DEPTH = 256
# Training state nests at most this deep (each level may take up to three JSON levels).
MAX_VALUE_DEPTH = 64
# Threads that hash mapped tensors in parallel (xxh3 releases the GIL), and the least work worth splitting.
HASH_THREADS = 2
PARALLEL_HASH_BYTES = 64 * 1024 * 1024
# Threads that copy loaded tensors into a live model, the least work worth splitting, and the size of a piece.
COPY_THREADS = 2
PARALLEL_COPY_BYTES = 32 * 1024 * 1024
COPY_PIECE_BYTES = 4 * 1024 * 1024
# Size of each of the two host buffers (pinned on CUDA) a load into device memory goes through.
STAGING_PIECE_BYTES = 32 * 1024 * 1024
# Threads that write (or read) the shards of a sharded folder at once.
IO_THREADS = 2
# Longest list a DCP folder's planner data may build (an index past it is a damaged file, not a big model).
MAX_DCP_LIST = 1 << 20
# torch.distributed: the longest a collective of a distributed save or load waits for the other ranks
# (a dead or stuck rank then fails the save everywhere instead of hanging it).
COLLECTIVE_TIMEOUT_S = 600.0
# A temporary of a save (".<name>.tmp-...") untouched for this long was left by a killed writer: the next
# save of the same name removes it (a live writer touches its temporary far more often).
STALE_TEMPORARY_S = 15 * 60.0
