"""A gdb remote stub for KVM guests (``vmm run --gdb tcp::1234``, ``-s``, ``-S``).

:mod:`~vmm.gdb.protocol` is the wire format and the register layout (pure),
:mod:`~vmm.gdb.session` pauses and resumes the vCPUs (all-stop), :mod:`~vmm.gdb.regs`
maps KVM's register structs to gdb's names and :mod:`~vmm.gdb.stub` serves the socket.
"""
