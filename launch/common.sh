# Shell helpers shared by the launchers; sourced, not run. The sourcing script
# sets $launcher (its name in messages) first.

# Prints the sourcing script's header comment (from line 2 to the first blank line).
usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  exit 0
}

die() {
  echo "$launcher: $*" >&2
  exit 2
}

# Prints its arguments as one line that a POSIX shell reads back as the same words.
quote() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}
