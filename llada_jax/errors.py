"""Errors a command reports in one line (see cli/common.user_errors) beside ValueError & co."""


class RunHalted(RuntimeError):
  """The run stopped itself to keep what it has: a checkpoint write failed, or too many steps in a row
  were non-finite. The message names the last good checkpoint and what to do."""


class RewardFailed(RuntimeError):
  """A reward function of an RL run raised, or returned something that is not a finite number. The
  message names the function and the completion; the run stops before that step updates anything."""
