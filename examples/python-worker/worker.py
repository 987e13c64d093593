#!/usr/bin/env python3
"""An ETL job that reports its run to the Vantage Sync State service.

    VANTAGE_SYNC_URL=http://127.0.0.1:8080 VANTAGE_SYNC_TOKEN=<service_role token> \
        python3 worker.py funds [--fail] [--retry-demo]

It marks the sync of RESOURCE started, does its (pretend) work, then marks
it completed with its counts, or failed with its errors when run with
--fail. Each step prints one line on standard output:

    started funds
    completed funds synced=3 created=1 updated=2
    failed funds errors=1

Retries and refusals are told on standard error. Exit codes: 0 the job
succeeded, 1 the job failed (and that was recorded), 2 bad usage, 3 the
API refused a step or could not be reached.

Needs httpx (Debian: apt-get install python3-httpx; or pip install httpx).
"""

import argparse
import os
import random
import sys
import time
import uuid

import httpx

START = """
mutation Start($resource: String!) {
  startSync(resource: $resource) { resource lastSyncStatus startedAt }
}"""

COMPLETE = """
mutation Complete($resource: String!, $synced: Int!, $created: Int!, $updated: Int!) {
  completeSync(resource: $resource, recordsSynced: $synced,
               recordsCreated: $created, recordsUpdated: $updated) {
    resource lastSyncStatus recordsSynced recordsCreated recordsUpdated durationMs
  }
}"""

FAIL = """
mutation Fail($resource: String!, $errors: [SyncErrorInput!]!) {
  failSync(resource: $resource, errors: $errors) { resource lastSyncStatus errorCount }
}"""

# The pretend source: records with the ids the target already holds.
SOURCE = [
    {"id": "f-1", "name": "Fund One"},
    {"id": "f-2", "name": "Fund Two"},
    {"id": "f-3", "name": "Fund Three"},
]
ALREADY_LOADED = {"f-1", "f-2"}

# Retrying: at most this many attempts per step, waiting 0.5 s, 1 s, 2 s,
# 4 s between them (with a little jitter, so workers that failed together
# do not retry together). About 8 s in all, then the worker gives up: a
# cron job should not hang for long on an API that is down.
ATTEMPTS = 5
FIRST_DELAY = 0.5
MAX_DELAY = 4.0
# Statuses that mean "try again": the server could not reach its database
# (503), or a proxy in front of it had no answer (502, 504).
RETRY_STATUSES = {502, 503, 504}


class ApiError(Exception):
    """The API refused a step, or could not be reached in time."""


def endpoint(url):
    """The GraphQL endpoint: the server's address with /graphql added, or
    the endpoint itself."""
    url = url.strip().rstrip("/")
    return url if url.endswith("/graphql") else url + "/graphql"


class Api:
    def __init__(self, url, token):
        self.url = endpoint(url)
        # A read timeout is when an idempotency key matters most: the
        # server may have applied the mutation, and only the retry with
        # the same key can tell the worker what it answered.
        self.http = httpx.Client(
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(10.0, connect=5.0),
        )

    def send(self, query, variables, key):
        """POSTs one mutation with `key` as its Idempotency-Key, retrying
        on network errors and 502/503/504 with the same key, so a retry
        of something already applied gets the first answer back instead
        of applying it twice. Returns (data, replayed)."""
        body = {"query": query, "variables": variables}
        headers = {"Idempotency-Key": key}
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = self.http.post(self.url, json=body, headers=headers)
            except httpx.TransportError as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code not in RETRY_STATUSES:
                    return self._answer(response)
                problem = f"HTTP {response.status_code}"
            if attempt == ATTEMPTS:
                raise ApiError(f"gave up after {ATTEMPTS} attempts: {problem}")
            delay = min(FIRST_DELAY * 2 ** (attempt - 1), MAX_DELAY)
            delay *= random.uniform(0.8, 1.2)
            print(f"retrying in {delay:.1f} s ({problem})", file=sys.stderr)
            time.sleep(delay)

    @staticmethod
    def _answer(response):
        replayed = response.headers.get("Idempotent-Replayed") == "true"
        try:
            body = response.json()
        except ValueError:
            raise ApiError(f"HTTP {response.status_code}: {response.text[:200]}")
        # Refusals (a bad token, a reused key, NOT_RUNNING, ...) come with
        # errors and an error code; GraphQL refusals are HTTP 200.
        errors = body.get("errors") or []
        if errors or response.status_code != 200:
            first = errors[0] if errors else {}
            code = (first.get("extensions") or {}).get("code", "ERROR")
            message = first.get("message", response.text[:200])
            raise ApiError(f"HTTP {response.status_code} {code}: {message}")
        return body["data"], replayed

    def close(self):
        self.http.close()


def work():
    """The job itself: here, counting the source's records."""
    synced = len(SOURCE)
    created = sum(1 for record in SOURCE if record["id"] not in ALREADY_LOADED)
    return synced, created, synced - created


def run(api, resource, fail, retry_demo):
    # A new key for each transition: the key names this run's start, this
    # run's completion; a retry of one of them reuses its key.
    api.send(START, {"resource": resource}, str(uuid.uuid4()))
    print(f"started {resource}", flush=True)

    if fail:
        errors = [
            {"code": "SOURCE_UNAVAILABLE", "message": "the source answered HTTP 500"}
        ]
        data, _ = api.send(
            FAIL, {"resource": resource, "errors": errors}, str(uuid.uuid4())
        )
        state = data["failSync"]
        print(f"failed {resource} errors={state['errorCount']}", flush=True)
        return 1

    synced, created, updated = work()
    variables = {
        "resource": resource,
        "synced": synced,
        "created": created,
        "updated": updated,
    }
    key = str(uuid.uuid4())
    data, _ = api.send(COMPLETE, variables, key)
    state = data["completeSync"]
    print(
        f"completed {resource} synced={state['recordsSynced']} "
        f"created={state['recordsCreated']} updated={state['recordsUpdated']}",
        flush=True,
    )

    if retry_demo:
        # What a worker does when it never got the answer: send the same
        # request with the same key. Without the key this would be refused
        # with NOT_RUNNING; with it, the first answer comes back and
        # nothing is applied twice.
        again, replayed = api.send(COMPLETE, variables, key)
        same = again == data
        print(
            f"retried completeSync {resource} replayed={str(replayed).lower()} "
            f"same_answer={str(same).lower()}",
            flush=True,
        )
    return 0


def main():
    parser = argparse.ArgumentParser(
        description="An ETL job that reports its run to the Vantage Sync State service."
    )
    parser.add_argument("resource", help="the resource this job syncs, e.g. funds")
    parser.add_argument(
        "--fail", action="store_true", help="pretend the job failed and report it"
    )
    parser.add_argument(
        "--retry-demo",
        action="store_true",
        help="send completeSync twice with one Idempotency-Key and show the replay",
    )
    args = parser.parse_args()
    url = os.environ.get("VANTAGE_SYNC_URL")
    token = os.environ.get("VANTAGE_SYNC_TOKEN")
    if not url or not token:
        parser.error(
            "set VANTAGE_SYNC_URL (e.g. http://127.0.0.1:8080) and "
            "VANTAGE_SYNC_TOKEN (a service_role token)"
        )

    api = Api(url, token)
    try:
        return run(api, args.resource, args.fail, args.retry_demo)
    except ApiError as error:
        print(f"error {args.resource}: {error}", file=sys.stderr)
        return 3
    finally:
        api.close()


if __name__ == "__main__":
    sys.exit(main())
