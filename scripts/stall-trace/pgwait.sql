select to_char(clock_timestamp() at time zone 'UTC','HH24:MI:SS.MS') t,
       coalesce(string_agg(e||'='||n, ' ' order by n desc),'') waits
  from (select case when backend_type='client backend' then '' else backend_type||'/' end
               || coalesce(wait_event_type||':'||wait_event,'CPU') e, count(*) n
          from pg_stat_activity
         where pid<>pg_backend_pid()
           and ((backend_type='client backend' and state in ('active','idle in transaction'))
                or (backend_type in ('checkpointer','walwriter','background writer') and wait_event is distinct from null and wait_event not in ('CheckpointerMain','WalWriterMain','BgWriterMain','BgWriterHibernate')))
         group by 1) s
\watch 0.02
