"""The order pipeline: validate -> charge -> reserve stock -> confirm, per tenant.

Failure modes on purpose, so the demo shows every path of the HTTP contract:

* ``charge_payment``: the payment gateway times out on the first try for one
  order in five; the task calls ``self.retry(countdown=1)`` (a new Cloud Tasks
  task, scheduled one second later).
* ``reserve_stock``: the warehouse is busy on the first delivery for one order
  in seven; the exception escapes, the endpoint answers 5xx and Cloud Tasks
  redelivers the same task.
* ``sync_legacy_erp``: always fails; after its last attempt it is dead-lettered.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from .celery import app


class GatewayTimeout(Exception):
    """The payment provider did not answer in time (transient)."""


class WarehouseBusy(Exception):
    """The stock service refused the reservation for now (transient)."""


class LegacyErpDown(Exception):
    """The old ERP never answers: this task always fails."""


def _cloudtasks(task: Task) -> dict[str, Any]:
    return getattr(task.request, "cloudtasks", None) or {}


@app.task(bind=True)
def validate_order(self: Task, order: dict[str, Any], *, tenant_id: str) -> dict[str, Any]:
    if not order.get("items"):
        raise ValueError(f"order {order['id']} has no items")
    total = sum(item["qty"] * item["price_cents"] for item in order["items"])
    return {**order, "tenant": tenant_id, "total_cents": total}


@app.task(bind=True, max_retries=3)
def charge_payment(self: Task, order: dict[str, Any], *, tenant_id: str) -> dict[str, Any]:
    if order["id"] % 5 == 0 and self.request.retries == 0:
        raise self.retry(
            exc=GatewayTimeout(f"gateway timeout for order {order['id']}"), countdown=1
        )
    return {**order, "charged": True, "payment_attempts": self.request.retries + 1}


@app.task(bind=True)
def reserve_stock(self: Task, order: dict[str, Any], *, tenant_id: str) -> dict[str, Any]:
    if order["id"] % 7 == 0 and _cloudtasks(self).get("retry_count", 0) == 0:
        raise WarehouseBusy(f"warehouse busy for order {order['id']}")
    return {**order, "reserved": True}


@app.task(bind=True)
def send_confirmation(self: Task, order: dict[str, Any], *, tenant_id: str) -> str:
    return f"order {order['id']} confirmed for {tenant_id}: {order['total_cents']} cents"


@app.task
def line_total(order: dict[str, Any]) -> int:
    return sum(item["qty"] * item["price_cents"] for item in order["items"])


@app.task
def compile_report(totals: list[int], tenant_id: str) -> dict[str, Any]:
    return {"tenant": tenant_id, "orders": len(totals), "revenue_cents": sum(totals)}


@app.task(bind=True)
def sync_legacy_erp(self: Task, order_id: int, *, tenant_id: str) -> None:
    raise LegacyErpDown(f"legacy ERP unreachable (order {order_id})")


def order_pipeline(order: dict[str, Any], tenant_id: str) -> Any:
    """The chain for one order; the confirmation goes to the tenant's high-priority queue."""
    from celery import chain

    return chain(
        validate_order.s(order, tenant_id=tenant_id),
        charge_payment.s(tenant_id=tenant_id),
        reserve_stock.s(tenant_id=tenant_id),
        send_confirmation.s(tenant_id=tenant_id).set(priority=9),
    )


def daily_report(orders: list[dict[str, Any]], tenant_id: str) -> Any:
    """A chord: one line total per order, then the report."""
    from celery import chord

    return chord((line_total.s(order) for order in orders), compile_report.s(tenant_id))
