"""Scale-out on torch.distributed: expert parallelism (experts sharded over a process group,
tokens exchanged with all-to-all) as one more execution strategy of the layer."""

from .all_to_all import ByteCount, count_bytes, exchange, exchange_counts
from .expert_parallel import TOKEN_SETS, ExpertParallel, check_expert_parallel, check_placement

__all__ = ["ByteCount", "count_bytes", "exchange", "exchange_counts", "ExpertParallel",
           "check_expert_parallel", "check_placement", "TOKEN_SETS"]
