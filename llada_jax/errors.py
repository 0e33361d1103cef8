"""Errors a command reports in one line (see cli/common.user_errors) beside ValueError & co."""


class RunHalted(RuntimeError):
  """The run stopped itself to keep what it has: a checkpoint write failed, or too many steps in a row
  were non-finite. The message names the last good checkpoint and what to do."""


class RewardFailed(RuntimeError):
  """A reward function of an RL run raised, or returned something that is not a finite number. The
  message names the function and the completion; the run stops before that step updates anything."""


class OptionError(ValueError):
  """A sampling option (or the prompt) out of its allowed range; `option` names it, so a caller that
  names options differently (the server's `max_tokens` for `gen_length`) can say which field was wrong."""

  def __init__(self, option: str, message: str):
    super().__init__(message)
    self.option = option
