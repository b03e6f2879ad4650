MAILER_DEFINITIONS
Mmailfeed, P=/opt/mailfeed/bin/mailfeed-fwd, F=mhu8, U=mailfeed:mailfeed,
	S=EnvFromSMTP/HdrFromSMTP, R=EnvToSMTP, T=DNS/RFC822/SMTP,
	A=mailfeed-fwd --config /etc/mailfeed/mx.toml -- $h $g $u
