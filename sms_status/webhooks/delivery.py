"""The delivery loop: in each server process, claims due events from the outbox, attempts
them on a few threads, and records how each attempt ended.

Nothing is sent from the request that stored a status: the callback's transaction only
adds the event (storage/outbox.py), and this loop, woken by `nudge()` or by its poll,
delivers it. A slow or dead receiver holds these threads only, never a callback's.

Leases make it safe to run in every worker of every instance: an event is attempted by the
holder of its lease alone, and a lease outlives its attempt's deadline, so an event is
claimed again only when its holder died mid-attempt (then it is sent again, with the same
`webhook-id`: at least once, never lost). A stopping server finishes its attempts for a
few seconds, then gives back the events still in flight for another process to claim.

A receiver that is down fails every attempt, hundreds a second under load: each failed
attempt and each event given up on is one line, but within a budget per process (a
LogBudget, sms_status/logs.py, as refused requests have), and while attempts fail a summary
line a minute counts them all, with the backlog.
"""

import logging
import queue
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from sms_status import metrics, rules
from sms_status.logs import LogBudget
from sms_status.storage import DATABASE_ERRORS, outbox, reads
from sms_status.storage.times import stored_time
from sms_status.webhooks.attempt import Attempt
from sms_status.webhooks.events import signed_headers

log = logging.getLogger("sms_status")

# Attempts one process makes at once: with 16, a loaded worker settled and claimed only a
# few events per write (docs/performance.md, "Status webhooks").
SLOTS = 32
# How often an idle loop looks for due events (events stored by this process wake it at
# once; those stored by other processes or instances, or due for a retry, wait this long).
POLL_SECONDS = 0.25
# How long a woken loop lets more events gather (and attempts end) before it settles and
# claims, so that a busy stream of callbacks is claimed in batches rather than one write per
# event. It is added to an event's delivery when the service is idle.
GATHER_SECONDS = 0.05
# A lease lasts the attempt's deadline plus this margin, for recording the outcome.
LEASE_MARGIN_SECONDS = 5.0
STOP_GRACE_SECONDS = 3.0
# After a database error the loop waits this long before trying again.
DATABASE_BACKOFF_SECONDS = 1.0
# Lines a minute per process about failed attempts, and as many about events given up on:
# enough to see what fails, too few to fill a disk while a receiver is down (docs/webhooks.md).
FAILURE_LINES_PER_MINUTE = 30
# While attempts fail, a summary line at most this often counts them all.
FAILURE_SUMMARY_SECONDS = 60


class Delivery:
    """Delivers the events of `storage`'s outbox to the receiver `settings` names
    (config.WebhookSettings)."""

    def __init__(self, settings, storage, clock=time.time):
        self.settings = settings
        self.storage = storage
        self.clock = clock
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.finished = queue.SimpleQueue()  # outcomes of ended attempts, to record
        self.in_flight = {}  # event id -> (its lease, its Attempt or None until it starts)
        self.lock = threading.Lock()
        self.thread = None
        self.pool = None
        self.failed_attempt_log = LogBudget(FAILURE_LINES_PER_MINUTE)
        self.gave_up_log = LogBudget(FAILURE_LINES_PER_MINUTE)
        # Since the last summary: when the first attempt failed, and how many did.
        self.failures_since, self.failed, self.gave_up, self.left_out = None, 0, 0, 0

    def start(self):
        """Starts the loop in this process (after gunicorn's fork: threads do not survive one)."""
        self.pool = ThreadPoolExecutor(SLOTS, thread_name_prefix="webhook-attempt")
        self.thread = threading.Thread(target=self.run, name="webhook-delivery", daemon=True)
        self.thread.start()
        log.info("Delivering status webhooks to %s", self.settings.display_url)

    def nudge(self):
        """Tells the loop that an event may have been stored."""
        self.wake.set()

    def stop(self, grace=STOP_GRACE_SECONDS):
        """Lets attempts in flight end for up to `grace` seconds, records them, and gives
        back the events still in flight (their attempts are cut off)."""
        if self.thread is None:
            return
        self.stopping.set()
        self.wake.set()
        deadline = time.monotonic() + grace
        self.thread.join(grace)
        try:
            while self.in_flight and time.monotonic() < deadline:
                self.record_finished()
                time.sleep(0.02)
            self.record_finished()
            with self.lock:
                cut_off = list(self.in_flight.values())
                self.in_flight.clear()
            for _, attempt in cut_off:
                if attempt is not None:
                    attempt.abort()
            if cut_off:
                outbox.release_webhook_events(self.storage,
                                              sorted({lease for lease, _ in cut_off}))
                log.info("Gave back %d status webhook event(s) still in flight on stopping",
                         len(cut_off))
        except DATABASE_ERRORS as error:
            log.error("Could not record or give back status webhook attempts on stopping: %s;"
                      " their events are attempted again when their leases end",
                      self.storage.describe_error(error))
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --- the loop -------------------------------------------------------------------------

    def run(self):
        while not self.stopping.is_set():
            try:
                self.turn()
            except DATABASE_ERRORS as error:
                log.error("Status webhooks: database error: %s; trying again in %g s",
                          self.storage.describe_error(error), DATABASE_BACKOFF_SECONDS)
                self.stopping.wait(DATABASE_BACKOFF_SECONDS)
            except Exception:  # the loop must outlive a bug, which the log then shows
                log.exception("Status webhooks: unexpected error in the delivery loop")
                self.stopping.wait(DATABASE_BACKOFF_SECONDS)

    def turn(self):
        """One round: record ended attempts, cut off overdue ones, claim into free slots,
        then wait for a nudge, an ended attempt, or the poll."""
        self.record_finished()
        self.summarise_failures()
        self.abort_overdue()
        free = SLOTS - len(self.in_flight)
        claimed = []
        if free > 0:
            claimed = outbox.claim_webhook_events(
                self.storage, secrets.token_hex(12), self.clock(),
                self.settings.timeout + LEASE_MARGIN_SECONDS, free)
        for event in claimed:
            with self.lock:
                self.in_flight[event["id"]] = (event["lease"], None)
            self.pool.submit(self.attempt, event)
        if claimed and len(claimed) == free:
            return  # more may be due right now
        self.wake.wait(POLL_SECONDS)
        if self.wake.is_set() and not self.stopping.is_set():
            self.wake.clear()
            self.stopping.wait(GATHER_SECONDS)

    def abort_overdue(self):
        now = time.monotonic()
        with self.lock:
            overdue = [attempt for _, attempt in self.in_flight.values()
                       if attempt is not None and attempt.overdue(now)]
        for attempt in overdue:
            attempt.abort()

    def new_attempt(self, event):
        """The attempt of a claimed event, signed now."""
        body = event["payload"]
        headers = signed_headers(event["id"], body, self.settings.secrets, self.clock())
        return Attempt(self.settings.url, body, headers, self.settings.timeout)

    def deliver_now(self, event_id):
        """Attempts one due event in the calling thread, unless another attempt of its
        message is in flight; returns whether it was attempted. For callers that want the
        outcome before they go on; the server's own attempts are the loop's."""
        claimed = outbox.claim_webhook_events(
            self.storage, secrets.token_hex(12), self.clock(),
            self.settings.timeout + LEASE_MARGIN_SECONDS, 1, event_id=event_id)
        if not claimed:
            return False
        event = claimed[0]
        attempt = self.new_attempt(event)
        deadline = threading.Timer(self.settings.timeout, attempt.abort)
        deadline.start()
        try:
            error = attempt.run()
        finally:
            deadline.cancel()
        next_at = self.next_attempt_at(event, error)
        outbox.settle_webhook_attempts(
            self.storage, [[event["id"], event["lease"], stored_time(self.clock()), error,
                            next_at]])
        self.log_outcome(event, error, next_at)
        return True

    def attempt(self, event):
        """Runs on an attempt thread: makes the attempt and queues its outcome."""
        attempt = self.new_attempt(event)
        with self.lock:
            if event["id"] not in self.in_flight:
                return  # given back by stop() before it started
            self.in_flight[event["id"]] = (event["lease"], attempt)
        error = attempt.run()
        self.finished.put((event, stored_time(self.clock()), error))
        self.wake.set()

    def record_finished(self):
        """Records every ended attempt in one write, and logs the failed ones."""
        outcomes, ended = [], []
        while True:
            try:
                event, at, error = self.finished.get_nowait()
            except queue.Empty:
                break
            next_at = self.next_attempt_at(event, error)
            outcomes.append([event["id"], event["lease"], at, error, next_at])
            ended.append((event, error, next_at))
        if not outcomes:
            return
        try:
            outbox.settle_webhook_attempts(self.storage, outcomes)
        finally:
            with self.lock:
                for event, _, _ in ended:
                    self.in_flight.pop(event["id"], None)
        for event, error, next_at in ended:
            self.log_outcome(event, error, next_at)

    def next_attempt_at(self, event, error):
        """When to try again after a failed attempt, or None to give up (or if delivered)."""
        if error is None:
            return None
        made = event["attempts"] + 1 - event["schedule_start"]  # in this round, this one too
        schedule = self.settings.retry_schedule
        if made > len(schedule):
            return None
        return stored_time(self.clock() + schedule[made - 1])

    def log_outcome(self, event, error, next_at):
        """Counts the attempt; a failed one is logged within its budget, and counted for
        the next summary."""
        metrics.count_webhook_attempt(
            "delivered" if error is None else "retrying" if next_at else "gave_up")
        if error is None:
            return
        now = self.clock()
        budget = self.failed_attempt_log if next_at else self.gave_up_log
        written = budget.take(now) is not None
        with self.lock:
            if self.failures_since is None:
                self.failures_since = now
            self.failed += 1
            self.gave_up += next_at is None
            self.left_out += not written
        if not written:
            return
        attempts = event["attempts"] + 1
        # A message's SID, or the number a reply or an opt-out is about, masked.
        about = event["message_sid"] or rules.mask_phone(event["stream"])
        if next_at is None:
            log.error("Gave up on status webhook %s for %s after %d attempts: %s",
                      event["id"], about, attempts, error)
        else:
            log.warning("Status webhook %s for %s failed (attempt %d): %s; next attempt at %s",
                        event["id"], about, attempts, error, next_at)

    def summarise_failures(self):
        """Once FAILURE_SUMMARY_SECONDS have passed since the first attempt that failed
        after the last summary, logs how many failed since then and the backlog."""
        now = self.clock()
        with self.lock:
            since = self.failures_since
        if since is None or now - since < FAILURE_SUMMARY_SECONDS:
            return
        pending = reads.pending_webhook_events(self.storage)
        with self.lock:
            failed, gave_up, left_out = self.failed, self.gave_up, self.left_out
            self.failures_since, self.failed, self.gave_up, self.left_out = None, 0, 0, 0
        log.warning("Status webhooks in the last %.0f s: %d attempts failed, %d of them the "
                    "last of their event's schedule (given up on); %d of these were not "
                    "logged one by one; %d events pending", now - since, failed, gave_up,
                    left_out, pending)
