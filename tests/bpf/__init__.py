"""bpf tier: natd's XDP datapath under BPF_PROG_TEST_RUN."""
