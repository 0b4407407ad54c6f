"""A gdb remote stub for KVM guests (``vmm run --gdb tcp::1234``, ``-s``, ``-S``).

:mod:`~vmm.gdb.protocol` is the wire format and the register layout (pure),
:mod:`~vmm.gdb.session` pauses and resumes the vCPUs (all-stop), :mod:`~vmm.gdb.target`
maps KVM's registers and guest-virtual memory to what gdb asks for, and
:mod:`~vmm.gdb.stub` serves the socket.
"""
