# shellcheck shell=bash
# Shared by tpu.sh and gpu.sh (sourced, not run): print-or-run helpers behind --dry_run.
# The sourcing script sets DRY_RUN.

is_true() { [[ "$1" == 1 || "$1" == true || "$1" == yes ]]; }

# Quotes one word for bash: bare when it is plainly safe, else in single quotes.
quote() {
  local s="$1"
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Like quote, but keeps a --flag= prefix outside the quotes: --config='a b'.
quote_arg() {
  if [[ "$1" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s%s' "${BASH_REMATCH[1]}" "$(quote "${BASH_REMATCH[2]}")"
  else
    quote "$1"
  fi
}

show() {
  local line="+" word
  for word in "$@"; do line+=" $(quote_arg "$word")"; done
  printf '%s\n' "$line"
}

# Runs a command, or in dry-run mode only prints it (stdout). Real runs echo it to stderr first.
run() {
  if is_true "${DRY_RUN:-0}"; then
    show "$@"
  else
    show "$@" >&2
    "$@"
  fi
}

die_usage() {
  local prog="${0##*/}"
  echo "$prog: $*" >&2
  echo "run 'launch/$prog --help' for usage" >&2
  exit 2
}

# Sets `subcommand`, DRY_RUN and each --lower_case_name=VALUE flag named in the caller's VARS array
# (flags win over the environment); calls the caller's `usage` for --help.
parse_args() {
  local arg name value known v
  subcommand=""
  for arg in "$@"; do
    case "$arg" in
      -h | --help) usage; exit 0 ;;
      --dry_run | --dry-run) DRY_RUN=1 ;;
      --*=*)
        name="${arg%%=*}"; name="${name#--}"
        name="$(printf '%s' "${name//-/_}" | tr '[:lower:]' '[:upper:]')"
        value="${arg#*=}"
        known=0
        for v in "${VARS[@]}"; do [[ "$v" == "$name" ]] && known=1; done
        [[ $known == 1 ]] || die_usage "unknown flag '${arg%%=*}'"
        printf -v "$name" '%s' "$value"
        ;;
      -*) die_usage "unknown flag '$arg'" ;;
      *)
        [[ -z "$subcommand" ]] || die_usage "one subcommand at a time (got '$subcommand' and '$arg')"
        subcommand="$arg"
        ;;
    esac
  done
}
