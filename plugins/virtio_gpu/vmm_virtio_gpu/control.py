"""The GPU's control-socket commands (vmmcore.control_socket's device-control contract).

`vmm gpu screenshot SOCK out.png` and the generic `device` command reach control() in a
control thread of the process that runs the device; it reads the display backend's
frames and feeds the attached virtio-input devices, and never touches the queues.
"""

from __future__ import annotations

from typing import Any


class GpuControl:
    """Mixin for VirtioGpu: needs self.display, self.scanouts, self.resources,
    self.resource_bytes and self.errors."""

    display: Any
    scanouts: list
    resources: dict
    resource_bytes: int
    errors: list

    control_commands = ("screenshot", "key", "pointer", "status")

    def control(self, command: str, args: dict) -> dict:
        """`vmm gpu screenshot` and the generic `device` command: runs in a control thread.

        screenshot {scanout=0, cursor=false}  -> {"png": bytes, width, height, scanout}
        key {code, down}                      a Linux key code into the keyboard input
        pointer {x, y, scanout=0, buttons={"left": bool, ...}}  into the tablet/mouse
        status {}                             -> scanouts, resources, recent errors
        """
        if command == "screenshot":
            index = self._control_scanout(args)
            frame = self.display.snapshot(index)
            if frame is None:
                raise ValueError(f"scanout {index} is not enabled (the guest shows nothing)")
            return {"png": self.display.screenshot(index, bool(args.get("cursor", False))),
                    "width": int(frame.shape[1]), "height": int(frame.shape[0]),
                    "scanout": index}
        if command == "key":
            code = int(args["code"])
            if not 0 < code < 0x300:
                raise ValueError(f"key code {code} is not a Linux key code")
            if not self.display.key(code, bool(args.get("down", True))):
                raise ValueError("no keyboard is attached (window_keyboard=true)")
            return {}
        if command == "pointer":
            from vmmcore.display import BTN_LEFT, BTN_MIDDLE, BTN_RIGHT

            names = {"left": BTN_LEFT, "right": BTN_RIGHT, "middle": BTN_MIDDLE}
            buttons = args.get("buttons") or {}
            if not isinstance(buttons, dict) or set(buttons) - set(names):
                raise ValueError(f"buttons must map {', '.join(names)} to true/false")
            if not self.display.pointer_absolute(
                    self._control_scanout(args), int(args["x"]), int(args["y"]),
                    {names[k]: bool(v) for k, v in buttons.items()}):
                raise ValueError("no pointer is attached (window_mouse=true)")
            return {}
        if command == "status":
            return {"scanouts": [{"resource": s.resource_id, "rect": list(s.rect),
                                  "mode": [s.width, s.height]} for s in self.scanouts],
                    "resources": len(self.resources), "resource_bytes": self.resource_bytes,
                    "errors": [list(e) for e in self.errors[-8:]]}
        raise ValueError(f"unknown command {command!r}")

    def _control_scanout(self, args: dict) -> int:
        index = int(args.get("scanout", 0))
        if not 0 <= index < len(self.scanouts):
            raise ValueError(f"scanout {index} does not exist (0..{len(self.scanouts) - 1})")
        return index
