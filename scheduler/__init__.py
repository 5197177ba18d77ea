"""Who runs this step: FCFS continuous batching over sequences, with chunked prefill and preemption."""
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import Scheduler, SchedulerOutput
from scheduler.sequence import Sequence, SequenceStatus

__all__ = ["SamplingParams", "Scheduler", "SchedulerOutput", "Sequence", "SequenceStatus"]
