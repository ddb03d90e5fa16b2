"""keras-tuner tuners for the VFBN search, and keras-tuner's chief/worker mode.

Each tuner (`TUNERS`) is keras-tuner's own with two changes to how a trial
can end:

- a trial whose loss stops being finite (`tuning.hypermodel.DivergenceGuard`)
  or that runs out of device memory is marked FAILED and the search goes
  on;
- any other error stops the search at once with that error, instead of
  keras-tuner's default of recording the trial as failed and moving on
  (which let a missing module fail every trial of a search silently). The
  interrupted trial is run again when the same command is started again.

Distributed search uses keras-tuner's environment: `KERASTUNER_TUNER_ID`
(`chief` for the process that serves the search, any other unique id for a
worker), `KERASTUNER_ORACLE_IP` and `KERASTUNER_ORACLE_PORT` (where the
chief listens and the workers connect).
"""

import os
import pathlib
import time

import keras_tuner
import tensorflow as tf
from absl import logging

TUNERS = ("random", "bayesian", "hyperband")
OBJECTIVE = "val_accuracy"
TUNER_ID = "KERASTUNER_TUNER_ID"
ORACLE_IP = "KERASTUNER_ORACLE_IP"
ORACLE_PORT = "KERASTUNER_ORACLE_PORT"


def distributed_role(environ=None):
    """This process's part in a keras-tuner search.

    Args:
        environ: the environment; default `os.environ`.

    Returns:
        `"standalone"` without `KERASTUNER_ORACLE_IP`; otherwise `"chief"`
        when `KERASTUNER_TUNER_ID` contains "chief" (keras-tuner's rule),
        else `"worker"`.

    Raises:
        ValueError: if `KERASTUNER_ORACLE_IP` is set without the port or the
            tuner id.
    """
    environ = os.environ if environ is None else environ
    if ORACLE_IP not in environ:
        return "standalone"
    missing = [name for name in (ORACLE_PORT, TUNER_ID) if name not in environ]
    if missing:
        raise ValueError(
            f"{ORACLE_IP} is set, so this is a distributed search, but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            f"not. Set {TUNER_ID}=chief on the chief and a unique id (e.g. "
            f"worker0) on each worker, and {ORACLE_PORT} to the chief's "
            "port on all of them."
        )
    return "chief" if "chief" in environ[TUNER_ID] else "worker"


class ChiefUnreachableError(RuntimeError):
    """A keras-tuner worker found no chief at the address it was given."""


def wait_for_chief(timeout_seconds, environ=None):
    """Waits until the chief's address accepts connections.

    keras-tuner's own client waits up to an hour for a chief that is not
    there (one that has finished and exited, or a wrong address); a worker
    checks first, with a deadline.

    Args:
        timeout_seconds: how long to wait.
        environ: the environment; default `os.environ`.

    Raises:
        ChiefUnreachableError: if nothing answers within `timeout_seconds`.
    """
    import grpc

    environ = os.environ if environ is None else environ
    address = f"{environ[ORACLE_IP]}:{environ[ORACLE_PORT]}"
    # Retry often: the chief may come up a moment after the worker.
    channel = grpc.insecure_channel(
        address, options=[("grpc.max_reconnect_backoff_ms", 2000)]
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_seconds)
    except grpc.FutureTimeoutError:
        raise ChiefUnreachableError(
            f"No keras-tuner chief answered at {address} ({ORACLE_IP}:"
            f"{ORACLE_PORT}) within {timeout_seconds:g}s. Start the chief "
            f"first ({TUNER_ID}=chief, the same command), check the address "
            "and port, or note that a chief exits once its search is over."
        ) from None
    finally:
        channel.close()


def failure_reason(trial):
    """The last line of a failed trial's message: the error it raised."""
    lines = [line for line in (trial.message or "").splitlines() if line]
    if not lines:
        return ""
    kind, _, text = lines[-1].partition(": ")
    if kind.endswith("FailedTrialError") and text:
        return text
    return lines[-1]


class _GuardedTuner:
    """Mixin over a keras-tuner tuner: which errors fail a trial, chief loop.

    Also declares the search space without building a model (keras-tuner
    otherwise builds the hypermodel, possibly several times, when the tuner
    is created), so the chief needs no data and workers start sooner.
    """

    chief_linger_seconds = 10.0

    def _populate_initial_space(self):
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def _run_and_update_trial(self, trial, *fit_args, **fit_kwargs):
        errors = keras_tuner.errors
        try:
            return super()._run_and_update_trial(trial, *fit_args, **fit_kwargs)
        except (errors.FailedTrialError, errors.FatalError):
            raise
        except tf.errors.ResourceExhaustedError as e:
            raise errors.FailedTrialError(
                f"Out of memory: {e.message.splitlines()[0]}"
            ) from e
        except Exception as e:
            raise errors.FatalRuntimeError(
                f"Trial {trial.trial_id} stopped the search: "
                f"{type(e).__name__}: {e}. Only a diverged (non-finite loss) "
                "or out-of-memory trial is skipped; anything else is a bug "
                "or a setup problem. Fix it and run the same command again: "
                "completed trials are kept and this one is run again."
            ) from e

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        reason = failure_reason(trial)
        if trial.status == "COMPLETED":
            # A worker's own copy of the trial has no metrics: they were
            # sent to the chief's oracle, so ask it.
            recorded = self.oracle.get_trial(trial.trial_id)
            logging.info(
                "Trial %s finished on tuner %s: COMPLETED, %s=%s",
                trial.trial_id,
                self.tuner_id,
                OBJECTIVE,
                _format_metric(recorded, OBJECTIVE),
            )
        else:
            logging.warning(
                "Trial %s finished on tuner %s: %s (%s)",
                trial.trial_id,
                self.tuner_id,
                trial.status,
                reason,
            )

    def search(self, *fit_args, **fit_kwargs):
        if distributed_role() != "chief":
            return super().search(*fit_args, **fit_kwargs)
        # keras-tuner's chief serves the oracle until the search is over,
        # checking every 20 seconds; this loop checks every second and then
        # keeps answering late workers for a while so that they exit too.
        if "verbose" in fit_kwargs:
            self.oracle.verbose = fit_kwargs["verbose"]
        self.save()
        serve_oracle(self.oracle, linger_seconds=self.chief_linger_seconds)


def _format_metric(trial, name):
    if not trial.metrics.exists(name):
        return "n/a"
    return f"{trial.metrics.get_last_value(name):.4f}"


def serve_oracle(oracle, linger_seconds=10.0, poll_seconds=1.0):
    """Serves `oracle` to keras-tuner workers until the search is over.

    Listens on `KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT` with
    keras-tuner's own gRPC service. Returns once every trial has ended and
    every worker that asked for a trial has been told to stop, plus
    `linger_seconds` during which workers that come late are told to stop.

    Args:
        oracle: the chief's `keras_tuner.Oracle`.
        linger_seconds: how long to keep answering after the search is over.
        poll_seconds: how often to check.

    Raises:
        OSError: if the address cannot be bound.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    address = f"{os.environ[ORACLE_IP]}:{os.environ[ORACLE_PORT]}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise OSError(
            f"The chief cannot listen on {address} ({ORACLE_IP}:"
            f"{ORACLE_PORT}): the port is in use or the address is not "
            "this machine's."
        )
    server.start()
    logging.info("Chief: serving the search on %s", address)
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(poll_seconds)
        logging.info(
            "Chief: every trial has ended; answering late workers for %gs",
            linger_seconds,
        )
        time.sleep(linger_seconds)
    finally:
        server.stop(grace=1)


class RandomSearch(_GuardedTuner, keras_tuner.RandomSearch):
    """`keras_tuner.RandomSearch` with the VFBN search's failure handling."""


class BayesianOptimization(_GuardedTuner, keras_tuner.BayesianOptimization):
    """`keras_tuner.BayesianOptimization` with the search's failure handling."""


class Hyperband(_GuardedTuner, keras_tuner.Hyperband):
    """`keras_tuner.Hyperband` with the VFBN search's failure handling."""


def make_tuner(
    kind,
    hypermodel,
    search_dir,
    max_trials=10,
    executions_per_trial=1,
    max_epochs=1,
    hyperband_factor=3,
    hyperband_iterations=1,
    bayesian_initial_points=0,
    max_consecutive_failed_trials=0,
    seed=0,
    distribution_strategy=None,
    chief_linger_seconds=10.0,
):
    """Creates (or reloads) a tuner whose objective is `val_accuracy`.

    An existing search in `search_dir` is reloaded and continued: completed
    trials are kept, a trial that was running is run again.

    Args:
        kind: one of `TUNERS`.
        hypermodel: a `tuning.hypermodel.VFBNHyperModel`.
        search_dir: the search's directory (keras-tuner's
            `directory/project_name`).
        max_trials: trials in all; for Hyperband a cap on its own schedule
            (0: no cap).
        executions_per_trial: models trained per trial; the objective is
            their mean.
        max_epochs: Hyperband's largest number of epochs per trial.
        hyperband_factor: Hyperband's reduction factor.
        hyperband_iterations: Hyperband's number of sweeps.
        bayesian_initial_points: random trials before the Gaussian process
            proposes (0: keras-tuner's default, 3 per hyperparameter).
        max_consecutive_failed_trials: stop after this many failed trials
            in a row (0: never).
        seed: the oracle's random seed.
        distribution_strategy: a `tf.distribute.Strategy` in whose scope
            every model is built; the tuner opens it, nobody else.
        chief_linger_seconds: see `serve_oracle`.

    Returns:
        A keras-tuner `Tuner`.
    """
    if kind not in TUNERS:
        raise ValueError(
            f"Expected `kind` to be one of {TUNERS}. Received: kind={kind!r}"
        )
    search_dir = pathlib.Path(search_dir)
    common = dict(
        hypermodel=hypermodel,
        objective=keras_tuner.Objective(OBJECTIVE, direction="max"),
        seed=seed,
        max_consecutive_failed_trials=max_consecutive_failed_trials or None,
        executions_per_trial=executions_per_trial,
        distribution_strategy=distribution_strategy,
        directory=str(search_dir.parent),
        project_name=search_dir.name,
        overwrite=False,
    )
    if kind == "random":
        tuner = RandomSearch(max_trials=max_trials, **common)
    elif kind == "bayesian":
        tuner = BayesianOptimization(
            max_trials=max_trials,
            num_initial_points=bayesian_initial_points or None,
            **common,
        )
    else:
        tuner = Hyperband(
            max_epochs=max_epochs,
            factor=hyperband_factor,
            hyperband_iterations=hyperband_iterations,
            **common,
        )
        if max_trials and distributed_role() != "worker":
            tuner.oracle.max_trials = max_trials
    tuner.chief_linger_seconds = chief_linger_seconds
    return tuner
