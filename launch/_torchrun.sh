# Sourced by single_node.sh and multi_node.sh: `run_torchrun ARGS...` runs torchrun ARGS so that
# a run survives a cluster (docs/operations.md):
# - torchrun handles SIGUSR1 as well as SIGTERM/SIGINT/SIGHUP/SIGQUIT (Slurm's early-warning
#   signal would otherwise kill the agent outright) and forwards them to the workers, which save a
#   checkpoint and stop; torchrun SIGKILLs workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by
#   default) after the signal, so the save must fit in that grace period;
# - a signal sent to this shell is passed on to torchrun's workers (forward_signal, below);
# - a preempted run exits 75 (the workers leave the marker file LAYERSKIP_PREEMPT_MARKER names),
#   whatever torchrun's own status (1 when it was signalled, 0 when only the workers were);
# - a stop is final: from the first preemption signal to this shell on, the file
#   LAYERSKIP_STOP_FILE names exists, and a worker that torchrun restarts after that
#   (MAX_RESTARTS: its peer failed during the preemption save) exits at once without training
#   (train/preemption.py); the job then ends non-zero, the save's error above (a signal to
#   torchrun itself ends torchrun: no restart either);
# - NCCL's flight recorder keeps the last collectives of every rank and dumps them when a
#   collective times out: the trainer itself configures it (monitor.nccl_trace_buffer,
#   train/flight_recorder.py) and points the dump at RUN_DIR/dumps/.
# torch 2.13: restarted workers can fail to rejoin when torchrun shares its rendezvous store
# across restarts (pytorch/pytorch#135712); a fresh store per restart avoids it.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# torchrun's --signals-to-handle (torch >= 2.13), as its environment default (older torch ignores it)
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
EXIT_PREEMPTED=75

# A signal to this shell goes to torchrun's workers (the training ranks), not to torchrun: they
# save and stop, torchrun sees them finish and exits. Sent to torchrun, it would add to the signal
# a scheduler sends torchrun itself (Slurm and `kill -- -PGID` signal every process), and a
# second signal cuts torchrun's wait for its workers short (each one restarts or ends the grace).
# Before the workers exist torchrun gets it (there is nothing to save yet).
forward_signal() {
  local sig="$1" agent="$2" stop="$3" workers
  [ -f "$stop" ] || echo "SIG$sig" > "$stop"  # before the workers learn it: no restart trains on
  workers="$(pgrep -P "$agent" || true)"
  # shellcheck disable=SC2086
  kill -s "$sig" ${workers:-$agent} 2>/dev/null || true
}

run_torchrun() {
  local marker stop pid rc=0
  marker="$(mktemp -u "${TMPDIR:-/tmp}/layerskip-preempted.XXXXXXXX")"
  stop="$(mktemp -u "${TMPDIR:-/tmp}/layerskip-stop.XXXXXXXX")"
  LAYERSKIP_PREEMPT_MARKER="$marker" LAYERSKIP_STOP_FILE="$stop" torchrun "$@" &
  pid=$!
  # shellcheck disable=SC2064
  for sig in TERM INT USR1 HUP; do trap "forward_signal $sig $pid $stop" "$sig"; done
  while :; do  # `wait` returns early when a trapped signal arrives; wait until torchrun is gone
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - TERM INT USR1 HUP
  if [ -f "$marker" ]; then
    echo "[launch] preempted, checkpoint saved: $(cat "$marker"); exit $EXIT_PREEMPTED (rerun to resume)" >&2
    rm -f "$marker" "$stop" "$stop.refused"
    return "$EXIT_PREEMPTED"
  fi
  # Stopped, no checkpoint of the stop, and torchrun failed or its restarted workers refused to
  # start: the preemption save failed. (Stopped with status 0 and no refusal: the signal came
  # as the run finished its last step, which saved it.)
  if [ -f "$stop" ] && { [ "$rc" != 0 ] || [ -f "$stop.refused" ]; }; then
    [ "$rc" != 0 ] || rc=1
    echo "[launch] stopped by $(cat "$stop") without a checkpoint of it: the preemption save failed" \
      "(its error is above); not restarted; exit $rc (a rerun resumes from the last complete checkpoint)" >&2
  fi
  rm -f "$stop" "$stop.refused"
  return "$rc"
}
