"""Seed data (products and users) and the value types the views work with."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class Product:
    sku: str
    name: str
    category: str
    price: Decimal
    description: str


@dataclass(frozen=True, slots=True)
class SeedUser:
    user_id: int
    username: str
    email: str
    full_name: str
    password: str


@dataclass(frozen=True, slots=True)
class CartLine:
    sku: str
    qty: int
    unit_price: Decimal

    @property
    def subtotal(self) -> Decimal:
        return self.unit_price * self.qty


@dataclass(frozen=True, slots=True)
class Cart:
    """What the cart page shows.

    ``lines`` may be empty while ``total_items`` is not, when the gateway only sent the
    totals (no ``X-Session-Cart-Contents``).
    """

    lines: tuple[CartLine, ...] = ()
    total_items: int = 0
    total_value: Decimal = Decimal("0.00")
    known: bool = field(default=True)  # False: no cart information reached us at all

    @classmethod
    def from_lines(cls, lines: tuple[CartLine, ...]) -> Cart:
        return cls(
            lines=lines,
            total_items=sum(line.qty for line in lines),
            total_value=sum((line.subtotal for line in lines), Decimal("0.00")),
        )


def _p(sku: str, name: str, category: str, price: str, description: str) -> Product:
    return Product(sku, name, category, Decimal(price), description)


PRODUCTS: tuple[Product, ...] = (
    _p("laptop-123", "UltraBook 14", "Computers", "999.99", "A 14-inch laptop, 1.2 kg."),
    _p("laptop-124", "WorkStation 16", "Computers", "1899.00", "16 cores for big builds."),
    _p("tablet-210", "SlateTab 11", "Computers", "449.00", "An 11-inch tablet with pen."),
    _p("mouse-456", "Silent Mouse", "Accessories", "29.99", "A mouse you cannot hear."),
    _p("keyboard-457", "Clicky Keyboard", "Accessories", "89.50", "A mechanical keyboard."),
    _p("monitor-300", "27in 4K Monitor", "Displays", "379.00", "27 inches, 3840x2160."),
    _p("monitor-301", "34in Ultrawide", "Displays", "649.00", "A curved 34-inch display."),
    _p("webcam-520", "HD Webcam", "Accessories", "59.00", "1080p at 60 frames/s."),
    _p("headset-610", "Studio Headset", "Audio", "129.00", "Closed-back, with microphone."),
    _p("speaker-611", "Desk Speakers", "Audio", "74.90", "A pair of small speakers."),
    _p("earbuds-612", "Wireless Earbuds", "Audio", "99.00", "Noise cancelling earbuds."),
    _p("ssd-700", "NVMe SSD 1 TB", "Storage", "79.99", "Fast storage, PCIe 4.0."),
    _p("hdd-701", "Backup Drive 4 TB", "Storage", "109.00", "A USB-C external drive."),
    _p("usb-702", "USB Stick 128 GB", "Storage", "14.99", "Small, USB 3.2."),
    _p("router-800", "Wi-Fi 6 Router", "Networking", "139.00", "Dual band, four LAN ports."),
    _p("switch-801", "8-Port Switch", "Networking", "39.00", "Gigabit, unmanaged."),
    _p("cable-802", "Cat 6 Cable 5 m", "Networking", "7.49", "Blue, snagless."),
    _p("chair-900", "Ergo Chair", "Furniture", "349.00", "Adjustable lumbar support."),
    _p("desk-901", "Standing Desk", "Furniture", "499.00", "Electric, two motors."),
    _p("lamp-902", "Desk Lamp", "Furniture", "34.95", "Dimmable LED lamp."),
)

# Documented in README.md; the passwords are public on purpose: this is a demo shop.
USERS: tuple[SeedUser, ...] = (
    SeedUser(1001, "alice", "alice@example.com", "Alice Archer", "alice-password"),
    SeedUser(1002, "bob", "bob@example.com", "Bob Baker", "bob-password"),
    SeedUser(1003, "carol", "carol@example.com", "Carol Chen", "carol-password"),
    SeedUser(12345, "john_doe", "john@example.com", "John Doe", "john-password"),
    SeedUser(1004, "zoë", "zoe+shop@example.com", "Zoë Ünicode", "zoe-password"),
    # The scripted walk's own (demo.py), so that it never touches a user a person tries.
    SeedUser(1900, "walker", "walker@example.com", "Demo Walker", "walker-password"),
)
