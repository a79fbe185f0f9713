import os

import requests
from django.http import JsonResponse

from .models import Order


def order(request, pk):
    """The ORM (an INSERT and a SELECT) and an outgoing HTTP call to the downstream server."""
    Order.objects.create(ref=f"order-{pk}")
    count = Order.objects.filter(ref=f"order-{pk}").count()
    downstream = requests.get(os.environ["DOWNSTREAM_URL"] + "/echo", timeout=10).json()
    return JsonResponse({"pk": pk, "count": count, "downstream_traceparent": downstream.get("traceparent")})
