"""Routes and provider health: which providers may carry a message, in which order, and which
of them are resting after repeated failures (circuit breakers).

* A **route** names destination countries (ISO 3166-1 alpha-2, or ``*`` for any) and an ordered
  list of providers. A message to a phone (SMS or voice) takes the first route that names its
  country, else the first ``*`` route; of that route, the providers that carry its channel, in
  order. An e-mail has no country: it goes to every provider that carries e-mail, in the order
  of the configuration.
* Each provider has a **circuit breaker**. ``closed``: sends go through; ``failure_threshold``
  consecutive failed sends (transient errors and sends left unanswered, never a refusal of one
  message) open it. ``open``: the provider is skipped for ``cooloff_seconds``. Then it is
  ``half_open``: one send is let through as a trial; its success closes the circuit, its failure
  opens it for another cool-off.

The state lives in the process that sends (each worker keeps its own): a provider that fails for
one worker is rested by that worker; the others find out by themselves.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from otpgate.domain.model import Channel

ANY_COUNTRY = "*"


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: The values of the ``otpgate_provider_circuit_state`` gauge.
CIRCUIT_GAUGE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


class CircuitBreaker:
    """One provider's breaker. ``clock`` reads seconds (monotonic by default)."""

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        cooloff_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or cooloff_seconds <= 0:
            raise ValueError("a breaker needs a threshold ≥ 1 and a positive cool-off")
        self.failure_threshold = failure_threshold
        self.cooloff_seconds = cooloff_seconds
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - self._opened_at >= self.cooloff_seconds:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def allows(self) -> bool:
        """Whether a send may go to this provider now. In ``half_open`` exactly one send is let
        through (the trial) until its outcome is recorded."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._trial_running:
            self._trial_running = True
            return True
        return False

    def resting_for(self) -> float:
        """Seconds until an open circuit lets a trial through (0 when it would now)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.cooloff_seconds - self._clock())

    def succeeded(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_running = False

    def release_trial(self) -> None:
        """The trial send ended with an outcome that says nothing about the provider (it
        refused one message): the next send may be the trial."""
        self._trial_running = False

    def failed(self) -> None:
        """A send failed (transiently or unanswered): a failed trial, or the threshold-th
        consecutive failure, opens the circuit for a new cool-off."""
        self._failures += 1
        if (
            self._trial_running
            or self._opened_at is not None
            or self._failures >= self.failure_threshold
        ):
            self._opened_at = self._clock()
        self._trial_running = False


@dataclass(slots=True)
class ProviderHealth:
    """What ``GET /v1/providers`` shows of one provider, as seen by this process."""

    name: str
    type: str
    breaker: CircuitBreaker
    sent: int = 0
    failed: int = 0
    last_error: str | None = None

    @property
    def state(self) -> CircuitState:
        return self.breaker.state


@dataclass(frozen=True, slots=True)
class Route:
    """Countries (upper-case ISO codes; empty means every country, ``*``) and providers."""

    countries: frozenset[str]
    providers: tuple[str, ...]

    @property
    def is_default(self) -> bool:
        return not self.countries


class Routing:
    """The routes and the channels each provider carries; answers which providers may carry a
    message, in order."""

    def __init__(
        self,
        routes: Sequence[Route],
        carriers: Mapping[str, frozenset[Channel]],
    ) -> None:
        for route in routes:
            if not route.providers:
                raise ValueError("a route needs at least one provider")
            unknown = [name for name in route.providers if name not in carriers]
            if unknown:
                raise ValueError(f"a route names unknown providers: {', '.join(unknown)}")
            if len(set(route.providers)) != len(route.providers):
                raise ValueError("a provider appears twice in one route")
        self.routes = tuple(routes)
        self._carriers = dict(carriers)
        self._email = tuple(name for name, chans in carriers.items() if Channel.EMAIL in chans)

    @property
    def providers(self) -> tuple[str, ...]:
        """Every provider, in the order of the configuration."""
        return tuple(self._carriers)

    @property
    def channels(self) -> frozenset[Channel]:
        """The channels some route (or, for e-mail, some provider) can deliver."""
        routed: set[Channel] = {
            channel
            for route in self.routes
            for name in route.providers
            for channel in self._carriers[name]
            if channel is not Channel.EMAIL
        }
        if self._email:
            routed.add(Channel.EMAIL)
        return frozenset(routed)

    def route_for(self, country: str | None) -> Route | None:
        """The route of a destination country: the first naming it, else the first default."""
        if country is not None:
            for route in self.routes:
                if country in route.countries:
                    return route
        for route in self.routes:
            if route.is_default:
                return route
        return None

    def providers_for(self, country: str | None, channel: Channel) -> tuple[str, ...]:
        """The providers that may carry a message on ``channel`` to ``country``, in order."""
        if channel is Channel.EMAIL:
            return self._email
        route = self.route_for(country)
        if route is None:
            return ()
        return tuple(name for name in route.providers if channel in self._carriers[name])

    @classmethod
    def single(cls, names: Iterable[str], carriers: Mapping[str, frozenset[Channel]]) -> Routing:
        """One default route through ``names`` in order (the environment form, and tests)."""
        return cls([Route(frozenset(), tuple(names))], carriers)
