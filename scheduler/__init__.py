"""Who runs this step: FCFS continuous batching over sequences, with chunked prefill and preemption."""
from kvserve.scheduler.sampling_params import SamplingParams
from kvserve.scheduler.scheduler import Scheduler, SchedulerOutput
from kvserve.scheduler.sequence import Sequence, SequenceStatus

__all__ = ["SamplingParams", "Scheduler", "SchedulerOutput", "Sequence", "SequenceStatus"]
