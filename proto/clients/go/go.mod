module meterd.dev/clients/go

go 1.19
