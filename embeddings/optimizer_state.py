"""The sparse optimizer's state, as fbgemm lays it out, counted by TorchRec's planner.

TorchRec 1.8's ``EmbeddingStorageEstimator`` counts optimizer memory only for a table
whose parameter carries ``_optimizer_classes`` (set by ``apply_optimizer_in_backward``);
state configured through the sharder's ``fused_params`` - our path, and the one TorchRec's
docs use for fused tables - counts as 0 bytes, so a plan it accepts can run out of memory.
Upstream TorchRec later (PR #3616, after 1.8) reads the optimizer from the sharder's
``fused_params["optimizer"]`` when the parameter carries none; 1.8 ships only the helper
(``emb_opt_type_to_optimizer_class``), not the wiring. Either way TorchRec sizes the state
as a multiple of the shard's weight bytes, which differs from fbgemm's layout in three
cases: rowwise Adagrad keeps one value per row *per column shard* (TorchRec: ``1/dim`` of
the weights, so a column shard is undercounted); the state is fp32 whatever the weights'
dtype (fp16 / int8 weights: undercounted); UVM-cached tables keep non-rowwise state in
host memory and rowwise state on the device (TorchRec: both tiers, in proportion).

:class:`OptimizerAwareStorageEstimator` does what the upstream fix does - read the
optimizer from the sharder's ``fused_params`` - with fbgemm's layout: it runs TorchRec's
estimator (weights, cache, input/output buffers) and adds each shard's optimizer state in
the tier fbgemm puts it. The sharder builds its kernels from the same ``fused_params``, so
the optimizer the planner counts is the optimizer the run gets.

State per shard of ``rows x cols`` (fbgemm ``construct_split_state``), fp32: Adam
``2 rows cols``, exact Adagrad ``rows cols``, rowwise Adagrad ``rows``, SGD 0.
Data-parallel tables (dense kernel) are updated by a torch Adam
(:func:`cdp_rec.training.optim.build_sharded_optimizer`): ``2 rows cols`` values in the
weights' dtype, on every replica.
"""

from __future__ import annotations

from typing import Any

from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
from torchrec.distributed.planner.types import SharderDataMap, ShardingOption, Storage

FP32_BYTES = 4

DENSE = EmbeddingComputeKernel.DENSE.value
FUSED = EmbeddingComputeKernel.FUSED.value
CACHING = EmbeddingComputeKernel.FUSED_UVM_CACHING.value

# fbgemm optimizer state, fp32: (values per element, values per row).
_FUSED_STATE: dict[str, tuple[int, int]] = {
    "adam": (2, 0),
    "adagrad": (1, 0),
    "rowwise_adagrad": (0, 1),
    "sgd": (0, 0),
}

OPTIMIZER_NAMES: dict[EmbOptimType, str] = {
    EmbOptimType.ADAM: "adam",
    EmbOptimType.EXACT_ADAGRAD: "adagrad",
    EmbOptimType.EXACT_ROWWISE_ADAGRAD: "rowwise_adagrad",
    EmbOptimType.EXACT_SGD: "sgd",
}


def optimizer_name(optimizer: Any) -> str:
    """``fused_params["optimizer"]`` (an EmbOptimType) -> our name; unknown types are refused."""
    try:
        return OPTIMIZER_NAMES[optimizer]
    except KeyError:
        raise ValueError(
            f"fused optimizer {optimizer!r}: its state layout is not known here "
            f"(known: {sorted(OPTIMIZER_NAMES.values())})"
        ) from None


def optimizer_bytes(rows: int, cols: int, optimizer: str, kernel: str, weight_bytes_per_value: int = FP32_BYTES) -> int:
    """Optimizer state of one ``rows x cols`` shard (a whole table is one shard).

    Args:
        optimizer: the fused optimizer name (``adam``, ``rowwise_adagrad``, ...).
        kernel: dense-kernel (data-parallel) tables get torch Adam: 2 values per element
            of ``weight_bytes_per_value`` bytes (the weights' dtype).
    """
    if kernel == DENSE:
        return 2 * rows * cols * weight_bytes_per_value
    per_elem, per_row = _FUSED_STATE[optimizer]
    return (per_elem * rows * cols + per_row * rows) * FP32_BYTES


def optimizer_in_hbm(kernel: str, optimizer: str, device_type: str) -> bool:
    """Where the state lives: with the weights (HBM on a GPU), except that UVM-cached
    tables keep non-rowwise state in UVM (host) and rowwise state on the device."""
    if device_type != "cuda":
        return False
    if kernel == CACHING:
        return optimizer == "rowwise_adagrad"
    return True


def optimizer_storage(
    rows: int, cols: int, optimizer: str, kernel: str, device_type: str, weight_bytes_per_value: int = FP32_BYTES
) -> Storage:
    """:func:`optimizer_bytes` in the tier :func:`optimizer_in_hbm` names."""
    n = optimizer_bytes(rows, cols, optimizer, kernel, weight_bytes_per_value)
    return Storage(hbm=n, ddr=0, ssd=0) if optimizer_in_hbm(kernel, optimizer, device_type) else Storage(0, n, 0)


def describe_optimizer(optimizer: str) -> str:
    return {
        "adam": "adam: 2 fp32 values per element",
        "adagrad": "adagrad: 1 fp32 value per element",
        "rowwise_adagrad": "rowwise_adagrad: 1 fp32 value per row",
        "sgd": "sgd: no state",
    }[optimizer]


class OptimizerAwareStorageEstimator(EmbeddingStorageEstimator):
    """TorchRec's storage estimator plus each shard's optimizer state (module docstring).

    The optimizer is ``fused_params["optimizer"]`` of the sharder that owns the table
    (the planner's ``SharderData`` snapshot of it); data-parallel tables count torch Adam.
    """

    def estimate(  # type: ignore[override]
        self, sharding_options: list[ShardingOption], sharder_data_map: SharderDataMap
    ) -> None:
        super().estimate(sharding_options, sharder_data_map)
        device_type = self._topology.compute_device
        for so in sharding_options:
            if getattr(so.tensor, "_optimizer_classes", None):
                # apply_optimizer_in_backward tagged it: TorchRec already counted (its multiple of) the state.
                raise ValueError(
                    f"table {so.name}: its parameter carries an in-backward optimizer; this planner counts "
                    f"the state from the sharder's fused_params and would count it twice"
                )
            fused = sharder_data_map[so.module_type_key].fused_params
            optimizer = optimizer_name(fused.get("optimizer"))
            width = so.tensor.element_size()
            for shard in so.shards:
                rows, cols = shard.size[0], shard.size[1]
                state = optimizer_storage(rows, cols, optimizer, so.compute_kernel, device_type, width)
                shard.storage = (shard.storage or Storage(0, 0, 0)) + state
