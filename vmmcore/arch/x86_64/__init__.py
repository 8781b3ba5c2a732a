"""x86-64: guest physical layout, Linux boot, page tables, CPUID, ACPI/MP tables."""
